"""The run report written next to a model and logged with its run: metric tables, ROC/PRO plots, heatmaps.

`write_report(report_dir, result, evaluator, model, test_records)` writes
    test_metrics.json   the evaluation result (per category and mean)
    per_category.csv    one row per category (and the mean) with every metric
    roc.png, pro.png    image/pixel ROC and PRO (FPR <= limit) curves, one line per category
    heatmaps.png        overlays of anomaly maps on test images (a normal and two anomalous per category)
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from dcad.core.data.images import load_image, load_mask
from dcad.core.data.records import Record
from dcad.core.metrics import METRIC_KEYS
from dcad.core.visualize import grid, heatmap_rgb, mask_outline, overlay, resize_map

TILE = 128  # px, tiles of the heatmap grid
CAPTION = 14  # px, caption strip above each row
ANOMALIES_PER_CATEGORY = 2
MAX_CATEGORIES = 12


def write_report(report_dir: Path, result: dict, evaluator=None, model=None, test_records: list[Record] | None = None) -> list[Path]:
    """Write every report file that the inputs allow; returns the files written."""
    report_dir.mkdir(parents=True, exist_ok=True)
    written = [write_metrics_json(report_dir / "test_metrics.json", result), write_metrics_csv(report_dir / "per_category.csv", result)]
    if evaluator is not None:
        written += write_curve_plots(report_dir, evaluator)
    if model is not None and test_records:
        written.append(write_heatmap_grid(report_dir / "heatmaps.png", model, test_records))
    return written


def write_metrics_json(path: Path, result: dict) -> Path:
    keep = {k: result[k] for k in ("categories", "mean") if k in result}
    path.write_text(json.dumps(keep, indent=2, allow_nan=True))
    return path


def write_metrics_csv(path: Path, result: dict) -> Path:
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["category", *METRIC_KEYS])
        for name, metrics in result["categories"].items():
            writer.writerow([name, *(_cell(metrics.get(k)) for k in METRIC_KEYS)])
        writer.writerow(["mean", *(_cell(result["mean"].get(k)) for k in METRIC_KEYS)])
    return path


def _cell(value) -> str:
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.6f}"


# ---- curves --------------------------------------------------------------------------------------
def write_curve_plots(report_dir: Path, evaluator) -> list[Path]:
    """roc.png (image and pixel ROC) and pro.png (PRO up to the FPR limit), a line per category."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    curves = {cat: evaluator.curves(cat) for cat in evaluator.categories}
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.5))
    for ax, key, title in zip(axes, ("image_roc", "pixel_roc"), ("Image ROC", "Pixel ROC")):
        for cat, c in curves.items():
            _line(ax, *c[key], cat)
        ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls="--")
        _style(ax, title, "false positive rate", "true positive rate")
    roc = report_dir / "roc.png"
    fig.tight_layout()
    fig.savefig(roc, dpi=100)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    for cat, c in curves.items():
        _line(ax, *c["pro"], cat)
    _style(ax, f"PRO (FPR <= {evaluator.fpr_limit:g})", "false positive rate", "per-region overlap")
    pro = report_dir / "pro.png"
    fig.tight_layout()
    fig.savefig(pro, dpi=100)
    plt.close(fig)
    return [roc, pro]


def _line(ax, x: np.ndarray, y: np.ndarray, label: str) -> None:
    if x.size:
        ax.plot(x, y, lw=1.2, label=label)


def _style(ax, title: str, xlabel: str, ylabel: str) -> None:
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, loc="lower right")


# ---- heatmaps ------------------------------------------------------------------------------------
def pick_records(records: list[Record], anomalies: int = ANOMALIES_PER_CATEGORY) -> list[Record]:
    """Per category (sorted, capped): its first normal test image and its first `anomalies` anomalous ones."""
    picked: list[Record] = []
    for cat in sorted({r.category for r in records})[:MAX_CATEGORIES]:
        of_cat = sorted((r for r in records if r.category == cat), key=lambda r: str(r.image_path))
        picked += [r for r in of_cat if r.label == 0][:1] + [r for r in of_cat if r.label == 1][:anomalies]
    return picked


def write_heatmap_grid(path: Path, model, records: list[Record]) -> Path:
    """A row per category: [image, overlay with ground-truth outline] for each picked image."""
    from dcad.core.predict import predict_arrays

    vmax = _display_max(model)
    rows: dict[str, list[np.ndarray]] = {}
    for record in pick_records(records):
        image = load_image(record.image_path)
        result = predict_arrays(model, [image], record.category)
        tile_image = _resize(image)
        heat = heatmap_rgb(resize_map(result.anomaly_maps[0], (TILE, TILE)), 0.0, vmax)
        tile = overlay(tile_image, heat)
        if record.mask_path is not None:
            tile[mask_outline(_resize_mask(load_mask(record.mask_path)))] = (255, 255, 255)
        caption = f"{record.defect_type} {result.scores[0]:.2f}{' !' if result.decisions[0] else ''}"
        rows.setdefault(record.category, []).extend([_captioned(tile_image, record.category), _captioned(tile, caption)])
    sheet = grid(list(rows.values())) if rows else np.full((TILE, TILE, 3), 255, np.uint8)
    Image.fromarray(sheet).save(path)
    return path


def _display_max(model) -> float:
    t = float(model.calibration.pixel_threshold)
    return 2 * t if np.isfinite(t) and t > 0 else 6.0


def _resize(image: np.ndarray) -> np.ndarray:
    return np.asarray(Image.fromarray(image).resize((TILE, TILE), Image.Resampling.BILINEAR))


def _resize_mask(mask: np.ndarray) -> np.ndarray:
    img = Image.fromarray(mask.astype(np.uint8) * 255).resize((TILE, TILE), Image.Resampling.NEAREST)
    return np.asarray(img) > 0


def _captioned(tile: np.ndarray, text: str) -> np.ndarray:
    canvas = Image.new("RGB", (TILE, TILE + CAPTION), (255, 255, 255))
    canvas.paste(Image.fromarray(tile), (0, CAPTION))
    ImageDraw.Draw(canvas).text((2, 1), text[:22], fill=(0, 0, 0))
    return np.asarray(canvas)
