"""`dcad predict`: anomaly maps, overlays and a CSV of scores and decisions for images on disk."""

from __future__ import annotations

import csv
import math
from collections import Counter
from pathlib import Path
from typing import Optional

import typer

from dcad.cli.console import console, err_console
from dcad.cli.train import MODEL_HELP
from dcad.core.errors import DcadError


def collect_images(inputs: list[Path]) -> list[tuple[Path, str]]:
    """Every image given (directories searched recursively), each with a distinct output name: its path
    below the directory given with `/` as `__` (`crack__000`), or a file's stem; repeats get `_2`, `_3` …"""
    from dcad.core.data.images import IMAGE_EXTENSIONS

    found: list[tuple[Path, str]] = []  # (file, output name)
    for item in inputs:
        if item.is_dir():
            files = sorted(p for p in item.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
            if not files:
                raise DcadError(f"{item}: directory holds no images ({', '.join(sorted(IMAGE_EXTENSIONS))})")
            found.extend((f, "__".join(f.relative_to(item).with_suffix("").parts)) for f in files)
        elif item.is_file():
            found.append((item, item.stem))
        else:
            raise DcadError(f"{item}: no such file or directory")
    seen: Counter[str] = Counter()
    distinct = []
    for path, name in found:
        seen[name] += 1
        distinct.append((path, name if seen[name] == 1 else f"{name}_{seen[name]}"))
    return distinct


def predict(
    model: str = typer.Argument(..., help=MODEL_HELP),
    inputs: list[Path] = typer.Argument(..., help="Image files or directories."),
    out: Path = typer.Option(..., "--out", help="Output directory for maps, overlays and predictions.csv."),
    category: Optional[str] = typer.Option(None, help="Category of all inputs (default: predicted per image)."),
    overwrite: bool = typer.Option(False, help="Replace a non-empty output directory."),
    device: str = typer.Option("auto"),
    batch_size: int = typer.Option(8),
    tracking_uri: Optional[str] = typer.Option(None, envvar="MLFLOW_TRACKING_URI", help="MLflow tracking URI."),
) -> None:
    """Score images: anomaly-map PNGs, overlays on the input, and a CSV of scores and decisions."""
    from PIL import Image

    from dcad.cli.common import prepare_output_dir, progress_bar
    from dcad.core.data.images import load_image
    from dcad.core.model.model_dir import load_model
    from dcad.core.predict import predict_arrays
    from dcad.core.visualize import heatmap_rgb, overlay, resize_map
    from dcad.platform.mlflow_model import resolve_model_dir
    from dcad.core.device import resolve_device

    net = load_model(resolve_model_dir(model, tracking_uri), resolve_device(device))
    if category is not None and category not in net.categories:
        raise DcadError(f"unknown category '{category}' (the model knows: {', '.join(net.categories)})")
    named = collect_images(inputs)
    files, names = [f for f, _ in named], [n for _, n in named]
    arrays = [load_image(f) for f in files]  # fail on a bad image before anything is written
    prepare_output_dir(out, overwrite)
    (out / "maps").mkdir()
    (out / "overlays").mkdir()
    rows = []
    vmin, vmax = _display_range(net)
    with progress_bar() as progress:
        task = progress.add_task("predicting", total=len(files))
        for start in range(0, len(files), batch_size):
            chunk = arrays[start : start + batch_size]
            result = predict_arrays(net, chunk, category)
            for i, (arr, name) in enumerate(zip(chunk, names[start : start + batch_size])):
                amap = resize_map(result.anomaly_maps[i], (arr.shape[1], arr.shape[0]))
                heat = heatmap_rgb(amap, vmin, vmax)
                Image.fromarray(heat).save(out / "maps" / f"{name}.png")
                Image.fromarray(overlay(arr, heat)).save(out / "overlays" / f"{name}.png")
                rows.append(_row(files[start + i], name, result, i, category))
            progress.update(task, completed=min(len(files), start + batch_size))
    with (out / "predictions.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    n_anom = sum(r["decision"] == "anomalous" for r in rows)
    console.print(f"{len(rows)} images: {n_anom} anomalous, {len(rows) - n_anom} normal → {out}")
    err_console.print(f"maps: {out / 'maps'}, overlays: {out / 'overlays'}, scores: {out / 'predictions.csv'}")


def _display_range(net) -> tuple[float, float]:
    t = float(net.calibration.pixel_threshold)
    return (0.0, 2 * t) if math.isfinite(t) and t > 0 else (0.0, 6.0)


def _row(path: Path, name: str, result, i: int, category: Optional[str]) -> dict:
    return {
        "path": str(path),
        "map": f"maps/{name}.png",
        "overlay": f"overlays/{name}.png",
        "category": result.categories[i],
        "category_source": "given" if category else "predicted",
        "score": f"{result.scores[i]:.6f}",
        "normalized_score": f"{result.normalized_scores[i]:.6f}",
        "decision": "anomalous" if result.decisions[i] else "normal",
    }


def register(app: typer.Typer) -> None:
    app.command("predict")(predict)
