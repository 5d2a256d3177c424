"""Exact ranking metrics computed from per-score tallies.

Everything here works on *tallies*: for each distinct score (or histogram bin), in ascending score
order, how many normal and how many anomalous samples have it. A sample is predicted anomalous
when its score is >= the threshold, and samples with equal scores (or in the same bin) switch
together, exactly as scikit-learn's `roc_curve`, `average_precision_score` and
`precision_recall_curve` treat ties. Undefined values (a class is missing) are `nan`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

_trapezoid = getattr(np, "trapezoid", None) or np.trapz  # numpy < 2 names it trapz


@dataclass(frozen=True)
class OperatingPoints:
    """Cumulative counts at each distinct threshold, from the highest threshold down.

    `keep[i]` is the index of the tally (ascending order) whose score is threshold i.
    """

    true_pos: np.ndarray
    false_pos: np.ndarray
    n_pos: float
    n_neg: float
    keep: np.ndarray

    @classmethod
    def from_tallies(cls, normal: np.ndarray, anomalous: np.ndarray) -> "OperatingPoints":
        """Build from ascending-score tallies; empty tallies are skipped (they are no threshold)."""
        keep = np.flatnonzero((normal > 0) | (anomalous > 0))[::-1]
        true_pos = np.cumsum(anomalous[keep], dtype=np.float64)
        false_pos = np.cumsum(normal[keep], dtype=np.float64)
        n_pos = float(true_pos[-1]) if keep.size else 0.0
        n_neg = float(false_pos[-1]) if keep.size else 0.0
        return cls(true_pos, false_pos, n_pos, n_neg, keep)

    @property
    def has_both_classes(self) -> bool:
        return self.n_pos > 0 and self.n_neg > 0


def tally_samples(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Distinct scores (ascending) with the number of normal and anomalous samples at each."""
    values, inverse = np.unique(scores, return_inverse=True)
    anomalous = np.bincount(inverse, weights=labels.astype(np.float64), minlength=values.size)
    normal = np.bincount(inverse, minlength=values.size) - anomalous
    return values, normal, anomalous


def roc_curve(points: OperatingPoints) -> tuple[np.ndarray, np.ndarray]:
    """(FPR, TPR) starting at (0, 0); empty arrays when a class is missing."""
    if not points.has_both_classes:
        return np.empty(0), np.empty(0)
    fpr = np.concatenate([[0.0], points.false_pos / points.n_neg])
    tpr = np.concatenate([[0.0], points.true_pos / points.n_pos])
    return fpr, tpr


def auroc(points: OperatingPoints) -> float:
    """Area under the ROC curve (trapezoids, so a tie counts one half). Never flipped."""
    fpr, tpr = roc_curve(points)
    return float(_trapezoid(tpr, fpr)) if fpr.size else float("nan")


def average_precision(points: OperatingPoints) -> float:
    """AP = sum over thresholds of (R_k - R_{k-1}) * P_k, as scikit-learn defines it."""
    if not points.has_both_classes:
        return float("nan")
    precision = points.true_pos / (points.true_pos + points.false_pos)
    recall_steps = np.diff(points.true_pos, prepend=0.0) / points.n_pos
    return float(np.sum(recall_steps * precision))


def f1_max(points: OperatingPoints) -> tuple[float, int]:
    """Best F1 = 2TP / (TP + FP + P) over thresholds, and the threshold's position in `points`.

    Defined as long as there are anomalous samples (the highest threshold wins a tie); otherwise
    (nan, -1).
    """
    if points.n_pos <= 0:
        return float("nan"), -1
    f1 = 2.0 * points.true_pos / (points.true_pos + points.false_pos + points.n_pos)
    best = int(np.argmax(f1))
    return float(f1[best]), best


def pro_curve(normal: np.ndarray, region_weight: np.ndarray, n_regions: int) -> tuple[np.ndarray, np.ndarray]:
    """(FPR, PRO) starting at (0, 0) from ascending tallies of normal pixels and of 1/|region|.

    PRO(t) = (1/R) * sum over anomalous pixels p with s_p >= t of 1/|region(p)|, i.e. the mean over
    the R regions of the fraction of each region's pixels above t. Empty arrays when undefined.
    """
    points = OperatingPoints.from_tallies(normal, region_weight)
    if n_regions <= 0 or points.n_neg <= 0:
        return np.empty(0), np.empty(0)
    fpr = np.concatenate([[0.0], points.false_pos / points.n_neg])
    pro = np.concatenate([[0.0], points.true_pos / n_regions])
    return fpr, pro


def truncate_curve(x: np.ndarray, y: np.ndarray, limit: float) -> tuple[np.ndarray, np.ndarray]:
    """The curve up to x = limit, ending with a point interpolated exactly at `limit`.

    `x` is non-decreasing and starts at 0; a curve ending before `limit` is returned unchanged.
    """
    end = int(np.searchsorted(x, limit, side="left"))  # first point with x >= limit
    if end >= x.size:
        return x, y
    if end == 0:
        return x[:1], y[:1]
    x0, x1, y0, y1 = x[end - 1], x[end], y[end - 1], y[end]
    y_at_limit = y0 + (y1 - y0) * (limit - x0) / (x1 - x0)
    return np.append(x[:end], limit), np.append(y[:end], y_at_limit)


def normalized_partial_area(x: np.ndarray, y: np.ndarray, limit: float) -> float:
    """Area under y(x) for x in [0, limit], divided by `limit` (nan for an empty curve)."""
    if x.size == 0:
        return float("nan")
    x_cut, y_cut = truncate_curve(x, y, limit)
    return float(_trapezoid(y_cut, x_cut) / limit)
