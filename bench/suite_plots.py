"""Figures of a suite run (matplotlib, Agg): quality against latency, and a grid of heatmaps."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from bench.suite_report import SUBTLE_DEFECTS  # noqa: E402


def quality_latency(summary: dict, path: Path, curve: list[str] | None = None) -> None:
    """Pixel AUROC and AUPRO (mean ± std over seeds) against inference ms/image (log scale); with `curve`
    (DRDC's refinement budgets, least to most refined) those joined by a dashed line, and a third panel:
    the curve alone, pixel AP against ms/image."""
    fig, axes = plt.subplots(1, 3 if curve else 2, figsize=(16.5 if curve else 11, 4.5))
    for ax, key, label in zip(axes, ("pixel_auroc", "aupro"), ("pixel AUROC", "AUPRO")):
        if curve:
            _curve_line(ax, summary, curve, key)
        _points(ax, summary, list(summary), key, label)
    if curve:
        _curve_line(axes[2], summary, curve, "pixel_ap")
        _points(axes[2], summary, curve, "pixel_ap", "pixel AP")
        axes[2].set_title("DRDC refinement budgets", fontsize=9)
    fig.suptitle("quality against latency (same backbone, data and machine)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _curve_line(ax, summary: dict, curve: list[str], key: str) -> None:
    ax.plot([summary[m]["speed"]["ms_per_image"]["mean"] for m in curve],
            [summary[m]["mean"][key]["mean"] for m in curve], "--", color="gray", lw=1, label="DRDC refinement budgets")
    ax.legend(fontsize=8, loc="lower right")


def _points(ax, summary: dict, methods: list[str], key: str, label: str) -> None:
    for i, method in enumerate(summary):
        if method not in methods:
            continue
        s = summary[method]
        x, y = s["speed"]["ms_per_image"], s["mean"][key]
        ax.errorbar(x["mean"], y["mean"], xerr=x["std"], yerr=y["std"], fmt="o", capsize=3, color=f"C{i % 10}")
        ax.annotate(method, (x["mean"], y["mean"]), textcoords="offset points", xytext=(5, 4), fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("inference latency (ms / image, log)")
    ax.set_ylabel(label)
    ax.grid(alpha=0.3)


def _display_range(maps: np.ndarray) -> tuple[float, float]:
    """One colour range per method (over its shown maps): its minimum to its 99.5th percentile."""
    return float(maps.min()), float(np.percentile(maps, 99.5))


def heatmap_grid(samples: dict, path: Path) -> None:
    """Rows: one test image per defect type; columns: image, ground truth, each method's heatmap."""
    methods = list(samples["maps"])
    if len(samples["images"]) == 0 or not methods:
        return
    images = samples["images"].permute(0, 2, 3, 1).numpy()
    rows, cols = len(images), 2 + len(methods)
    fig, axes = plt.subplots(rows, cols, figsize=(1.6 * cols, 1.6 * rows + 0.4), squeeze=False)
    ranges = {m: _display_range(samples["maps"][m].numpy()) for m in methods}
    for r in range(rows):
        defect = samples["defects"][r]
        axes[r, 0].imshow(images[r])
        axes[r, 0].set_ylabel(f"{samples['categories'][r]}\n{defect}", fontsize=7,
                              fontweight="bold" if defect in SUBTLE_DEFECTS else "normal")
        axes[r, 1].imshow(samples["masks"][r].numpy(), cmap="gray", vmin=0, vmax=1)
        for c, method in enumerate(methods, start=2):
            vmin, vmax = ranges[method]
            axes[r, c].imshow(samples["maps"][method][r].numpy(), cmap="jet", vmin=vmin, vmax=vmax,
                              interpolation="nearest")
    for c, title in enumerate(["image", "ground truth", *methods]):
        axes[0, c].set_title(title, fontsize=7)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
