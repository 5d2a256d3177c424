"""Metric values from stored image scores (exact) and pixel histograms (binned)."""

from __future__ import annotations

from typing import Any

import numpy as np

from dcad.core.metrics.batch import check_labels, check_scores
from dcad.core.metrics.curves import (
    OperatingPoints,
    auroc,
    average_precision,
    f1_max,
    normalized_partial_area,
    pro_curve,
    tally_samples,
)
from dcad.core.metrics.histogram import PixelHistogram

NAN = float("nan")


def image_points(scores: np.ndarray, labels: np.ndarray) -> OperatingPoints:
    _, normal, anomalous = tally_samples(scores, labels)
    return OperatingPoints.from_tallies(normal, anomalous)


def pixel_points(histogram: PixelHistogram) -> OperatingPoints:
    return OperatingPoints.from_tallies(histogram.normal, histogram.anomalous)


def image_metrics(scores: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """image_auroc, image_ap, image_f1max; all nan unless there are normal and anomalous images."""
    points = image_points(scores, labels)
    if not points.has_both_classes:
        return {"image_auroc": NAN, "image_ap": NAN, "image_f1max": NAN}
    return {"image_auroc": auroc(points), "image_ap": average_precision(points), "image_f1max": f1_max(points)[0]}


def pixel_metrics(histogram: PixelHistogram, fpr_limit: float) -> dict[str, float]:
    """pixel_auroc, pixel_ap, pixel_f1max, aupro; all nan unless there are normal and anomalous pixels."""
    points = pixel_points(histogram)
    if not points.has_both_classes:
        return {"pixel_auroc": NAN, "pixel_ap": NAN, "pixel_f1max": NAN, "aupro": NAN}
    fpr, pro = pro_curve(histogram.normal, histogram.region_weight, histogram.n_regions)
    return {
        "pixel_auroc": auroc(points),
        "pixel_ap": average_precision(points),
        "pixel_f1max": f1_max(points)[0],
        "aupro": normalized_partial_area(fpr, pro, fpr_limit),
    }


def f1_max_threshold(scores: Any, labels: Any) -> tuple[float, float]:
    """(best F1, threshold) over image-level scores, exactly; `score >= threshold` is anomalous.

    Accepts numpy arrays or torch tensors. Returns (nan, nan) when there is no anomalous sample
    (F1 is then 0 at every threshold). Among thresholds with the same F1 the highest wins.
    """
    values = check_scores(scores, "scores")
    flags = check_labels(labels, values.size, "scores")
    distinct, normal, anomalous = tally_samples(values, flags)
    points = OperatingPoints.from_tallies(normal, anomalous)
    best_f1, position = f1_max(points)
    if position < 0:
        return NAN, NAN
    return best_f1, float(distinct[points.keep[position]])
