"""`dcad predict`: anomaly maps, overlays and a CSV of scores and decisions for images on disk."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Optional

import typer

from dcad.cli.console import console, err_console
from dcad.cli.train import MODEL_HELP, resolve_model_dir
from dcad.core.errors import DcadError


def collect_images(inputs: list[Path]) -> list[Path]:
    from dcad.core.data.images import IMAGE_EXTENSIONS

    files: list[Path] = []
    for item in inputs:
        if item.is_dir():
            found = sorted(p for p in item.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
            if not found:
                raise DcadError(f"{item}: directory holds no images ({', '.join(sorted(IMAGE_EXTENSIONS))})")
            files.extend(found)
        elif item.is_file():
            files.append(item)
        else:
            raise DcadError(f"{item}: no such file or directory")
    return files


def _unique_stems(files: list[Path]) -> list[str]:
    seen: dict[str, int] = {}
    stems = []
    for f in files:
        stem = f.stem
        n = seen.get(stem, 0)
        seen[stem] = n + 1
        stems.append(stem if n == 0 else f"{stem}_{n}")
    return stems


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
    from dcad.train.pipeline import resolve_device

    net = load_model(resolve_model_dir(model, tracking_uri), resolve_device(device))
    if category is not None and category not in net.categories:
        raise DcadError(f"unknown category '{category}' (the model knows: {', '.join(net.categories)})")
    files = collect_images(inputs)
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
            for i, (arr, stem) in enumerate(zip(chunk, _unique_stems(files)[start : start + batch_size])):
                amap = resize_map(result.anomaly_maps[i], (arr.shape[1], arr.shape[0]))
                heat = heatmap_rgb(amap, vmin, vmax)
                Image.fromarray(heat).save(out / "maps" / f"{stem}.png")
                Image.fromarray(overlay(arr, heat)).save(out / "overlays" / f"{stem}.png")
                rows.append(_row(files[start + i], result, i, category))
            progress.update(task, completed=min(len(files), start + batch_size))
    _write_csv(out / "predictions.csv", rows)
    n_anom = sum(r["decision"] == "anomalous" for r in rows)
    console.print(f"{len(rows)} images: {n_anom} anomalous, {len(rows) - n_anom} normal → {out}")
    err_console.print(f"maps: {out / 'maps'}, overlays: {out / 'overlays'}, scores: {out / 'predictions.csv'}")


def _display_range(net) -> tuple[float, float]:
    import numpy as np

    t = float(net.calibration.pixel_threshold)
    return (0.0, 2 * t) if np.isfinite(t) and t > 0 else (0.0, 6.0)


def _row(path: Path, result, i: int, category: Optional[str]) -> dict:
    return {
        "path": str(path),
        "category": result.categories[i],
        "category_source": "given" if category else "predicted",
        "score": f"{result.scores[i]:.6f}",
        "normalized_score": f"{result.normalized_scores[i]:.6f}",
        "decision": "anomalous" if result.decisions[i] else "normal",
    }


def _write_csv(path: Path, rows: list[dict]) -> None:
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def register(app: typer.Typer) -> None:
    app.command("predict")(predict)
