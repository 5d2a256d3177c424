"""The run report written next to a model: metrics files, ROC/PRO curves and a heatmap grid (docs/cluster.md §4)."""

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
CAPTION = 14  # px, caption strip above each tile
ANOMALIES_PER_CATEGORY = 2
MAX_CATEGORIES = 12


def write_report(report_dir: Path, result: dict, evaluator=None, model=None,
                 test_records: list[Record] | None = None) -> list[Path]:
    """test_metrics.json, per_category.csv and, when the inputs allow, roc.png, pro.png and heatmaps.png."""
    report_dir.mkdir(parents=True, exist_ok=True)
    written = [report_dir / "test_metrics.json", report_dir / "per_category.csv"]
    written[0].write_text(json.dumps({k: result[k] for k in ("categories", "mean") if k in result}, indent=2, allow_nan=True))
    with written[1].open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["category", *METRIC_KEYS])
        for name, metrics in [*result["categories"].items(), ("mean", result["mean"])]:
            writer.writerow([name, *(_cell(metrics.get(k)) for k in METRIC_KEYS)])
    if evaluator is not None:
        written += write_curve_plots(report_dir, evaluator)
    if model is not None and test_records:
        written.append(write_heatmap_grid(report_dir / "heatmaps.png", model, test_records))
    return written


def _cell(value) -> str:
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.6f}"


def write_curve_plots(report_dir: Path, evaluator) -> list[Path]:
    """roc.png (image and pixel ROC) and pro.png (PRO up to the FPR limit), a line per category."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    curves = {cat: evaluator.curves(cat) for cat in evaluator.categories}
    roc_fig, roc_axes = plt.subplots(1, 2, figsize=(10, 4.5))
    pro_fig, pro_ax = plt.subplots(figsize=(5.5, 4.5))
    panels = [(roc_axes[0], "image_roc", "Image ROC", "true positive rate"),
              (roc_axes[1], "pixel_roc", "Pixel ROC", "true positive rate"),
              (pro_ax, "pro", f"PRO (FPR <= {evaluator.fpr_limit:g})", "per-region overlap")]
    for ax, key, title, ylabel in panels:
        for cat, c in curves.items():
            if c[key][0].size:
                ax.plot(*c[key], lw=1.2, label=cat)
        if key != "pro":
            ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls="--")
        ax.set(title=title, xlabel="false positive rate", ylabel=ylabel, ylim=(0, 1.02))
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, loc="lower right")
    paths = [report_dir / "roc.png", report_dir / "pro.png"]
    for fig, path in zip((roc_fig, pro_fig), paths):
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
    return paths


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

    t = float(model.calibration.pixel_threshold)
    vmax = 2 * t if np.isfinite(t) and t > 0 else 6.0
    rows: dict[str, list[np.ndarray]] = {}
    for record in pick_records(records):
        image = load_image(record.image_path)
        result = predict_arrays(model, [image], record.category)
        tile_image = np.asarray(Image.fromarray(image).resize((TILE, TILE), Image.Resampling.BILINEAR))
        tile = overlay(tile_image, heatmap_rgb(resize_map(result.anomaly_maps[0], (TILE, TILE)), 0.0, vmax))
        if record.mask_path is not None:
            mask = Image.fromarray(load_mask(record.mask_path).astype(np.uint8) * 255)
            tile[mask_outline(np.asarray(mask.resize((TILE, TILE), Image.Resampling.NEAREST)) > 0)] = (255, 255, 255)
        caption = f"{record.defect_type} {result.scores[0]:.2f}{' !' if result.decisions[0] else ''}"
        rows.setdefault(record.category, []).extend([_captioned(tile_image, record.category), _captioned(tile, caption)])
    Image.fromarray(grid(list(rows.values())) if rows else np.full((TILE, TILE, 3), 255, np.uint8)).save(path)
    return path


def _captioned(tile: np.ndarray, text: str) -> np.ndarray:
    canvas = Image.new("RGB", (TILE, TILE + CAPTION), (255, 255, 255))
    canvas.paste(Image.fromarray(tile), (0, CAPTION))
    ImageDraw.Draw(canvas).text((2, 1), text[:22], fill=(0, 0, 0))
    return np.asarray(canvas)
