"""Streaming, mergeable evaluator: per-category anomaly-detection metrics in bounded memory.

Image-level metrics are exact (one score per image is kept). Pixel-level metrics (pixel AUROC,
AP, F1-max and AUPRO) come from a `PixelHistogram` per category (per defect type with
`track_defect_types`), so memory does not grow with the number of maps; with the default
2**14 bins they agree with an exact computation within 1e-3.

Undefined cases give `nan`, never an error: the image-level metrics of a category without normal
or without anomalous images, the pixel-level ones without normal or without anomalous pixels.
A `nan` is left out of the unweighted mean over categories (the mean is `nan` only if every
category is `nan`). AUCs below 0.5 are reported as they are, never flipped.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from dcad.core.errors import MetricsError
from dcad.core.metrics.batch import EvalBatch, check_batch
from dcad.core.metrics.curves import pro_curve, roc_curve, truncate_curve
from dcad.core.metrics.histogram import PixelHistogram
from dcad.core.metrics.regions import region_weights
from dcad.core.metrics.scoring import image_metrics, image_points, pixel_metrics, pixel_points

METRIC_KEYS: tuple[str, ...] = (
    "image_auroc",
    "pixel_auroc",
    "aupro",
    "image_ap",
    "pixel_ap",
    "image_f1max",
    "pixel_f1max",
)
DEFECT_METRIC_KEYS: tuple[str, ...] = ("image_auroc", "pixel_auroc", "aupro", "pixel_ap")
DEFAULT_NUM_BINS = 2**14
STATE_FORMAT = "dcad.metrics.AnomalyEvaluator/1"

GOOD = "good"  # the group of normal images when defect types are tracked
_ALL = "all"  # the single group when they are not


class _CategoryState:
    """Everything kept for one category: image scores/labels/groups and a histogram per group."""

    def __init__(self, num_bins: int) -> None:
        self.num_bins = num_bins
        self._scores: list[np.ndarray] = []
        self._labels: list[np.ndarray] = []
        self._groups: list[str] = []
        self.pixels: dict[str, PixelHistogram] = {}

    def add_images(self, scores: np.ndarray, labels: np.ndarray, group: str) -> None:
        self._scores.append(scores)
        self._labels.append(labels)
        self._groups.extend([group] * scores.size)

    def histogram(self, group: str) -> PixelHistogram:
        if group not in self.pixels:
            self.pixels[group] = PixelHistogram(self.num_bins)
        return self.pixels[group]

    def images(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """All (scores, labels, groups) so far, concatenated once and kept that way."""
        if len(self._scores) != 1:
            self._scores = [np.concatenate(self._scores) if self._scores else np.zeros(0)]
            self._labels = [np.concatenate(self._labels) if self._labels else np.zeros(0, bool)]
        return self._scores[0], self._labels[0], np.asarray(self._groups, dtype=object)

    def combined(self, groups: Iterable[str] | None = None) -> PixelHistogram:
        """One histogram over the given groups (all groups by default)."""
        total = PixelHistogram(self.num_bins)
        for group in self.pixels if groups is None else groups:
            if group in self.pixels:
                total.merge(self.pixels[group])
        return total

    def metrics(self, fpr_limit: float) -> dict[str, float]:
        scores, labels, _ = self.images()
        values = image_metrics(scores, labels) | pixel_metrics(self.combined(), fpr_limit)
        return {key: values[key] for key in METRIC_KEYS}

    def defect_metrics(self, fpr_limit: float) -> dict[str, dict[str, float]]:
        """Per defect type, against this category's normal images (and their pixels)."""
        scores, labels, groups = self.images()
        result = {}
        for defect in sorted(set(self._groups) - {GOOD}):
            chosen = (groups == defect) | (groups == GOOD)
            values = image_metrics(scores[chosen], labels[chosen]) | pixel_metrics(
                self.combined([GOOD, defect]), fpr_limit
            )
            result[defect] = {key: values[key] for key in DEFECT_METRIC_KEYS}
        return result

    def merge(self, other: "_CategoryState") -> None:
        scores, labels, groups = other.images()
        self._scores.append(scores.copy())
        self._labels.append(labels.copy())
        self._groups.extend(groups.tolist())
        for group, histogram in other.pixels.items():
            self.histogram(group).merge(histogram)

    def state_dict(self) -> dict[str, Any]:
        scores, labels, groups = self.images()
        return {
            "image_scores": scores.copy(),
            "image_labels": labels.copy(),
            "image_groups": groups.tolist(),
            "pixels": {group: histogram.state_dict() for group, histogram in self.pixels.items()},
        }

    @classmethod
    def from_state_dict(cls, state: dict[str, Any], num_bins: int) -> "_CategoryState":
        category = cls(num_bins)
        category._scores = [np.asarray(state["image_scores"], np.float64)]
        category._labels = [np.asarray(state["image_labels"], bool)]
        category._groups = [str(group) for group in state["image_groups"]]
        category.pixels = {group: PixelHistogram.from_state_dict(h) for group, h in state["pixels"].items()}
        return category


class AnomalyEvaluator:
    """Accumulates batches of scores, labels, maps and masks; computes per-category metrics.

    `num_bins`: most occupied histogram bins per category (and defect type) for the pixel-level
    metrics; memory is at most 32 bytes per bin.
    `fpr_limit`: AUPRO integrates PRO over FPR in [0, fpr_limit] and divides by it.
    `track_defect_types`: also report pixel_auroc, aupro, pixel_ap and image_auroc per defect type,
    each against the category's normal images; `update` then needs `defect_types`.
    """

    def __init__(
        self, num_bins: int = DEFAULT_NUM_BINS, fpr_limit: float = 0.3, track_defect_types: bool = False
    ) -> None:
        if not isinstance(num_bins, (int, np.integer)) or num_bins < 16:
            raise MetricsError(f"num_bins: must be an integer >= 16, got {num_bins!r}")
        if not 0.0 < fpr_limit <= 1.0:
            raise MetricsError(f"fpr_limit: must be in (0, 1], got {fpr_limit!r}")
        self.num_bins = int(num_bins)
        self.fpr_limit = float(fpr_limit)
        self.track_defect_types = bool(track_defect_types)
        self._categories: dict[str, _CategoryState] = {}

    @property
    def categories(self) -> list[str]:
        return sorted(self._categories)

    def reset(self) -> None:
        self._categories.clear()

    def update(
        self,
        image_scores: Any,
        labels: Any,
        anomaly_maps: Any,
        masks: Any,
        categories: Sequence[str] | str,
        defect_types: Sequence[str] | None = None,
    ) -> None:
        """Add one batch. Arrays may be numpy or torch (any device).

        image_scores (B,), labels (B,) 0/1, anomaly_maps (B,H,W) or (B,1,H,W), masks the same
        shape (>0 = anomalous), categories one name per image (or one name for the batch),
        defect_types one name per image (needed with `track_defect_types`; ignored otherwise).
        """
        batch = check_batch(image_scores, labels, anomaly_maps, masks, categories, defect_types)
        for (category, group), positions in self._split(batch).items():
            state = self._categories.setdefault(category, _CategoryState(self.num_bins))
            state.add_images(batch.image_scores[positions], batch.labels[positions], group)
            maps, masks_in_group = _take(batch.anomaly_maps, positions), _take(batch.masks, positions)
            weights, n_regions = region_weights(masks_in_group)
            state.histogram(group).add(maps, masks_in_group, weights, n_regions)

    def compute(self) -> dict[str, Any]:
        """{"categories": {cat: {key: value}}, "mean": {key: value}} (+ "defect_types" if tracked)."""
        per_category = {name: self._categories[name].metrics(self.fpr_limit) for name in self.categories}
        result: dict[str, Any] = {"categories": per_category, "mean": _mean_over(per_category.values())}
        if self.track_defect_types:
            result["defect_types"] = {
                name: self._categories[name].defect_metrics(self.fpr_limit) for name in self.categories
            }
        return result

    def curves(self, category: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """Curves for plots: image and pixel ROC as (fpr, tpr), PRO as (fpr, pro) up to fpr_limit.

        A curve that is undefined (a class missing) is a pair of empty arrays.
        """
        state = self._state(category)
        scores, labels, _ = state.images()
        pixels = state.combined()
        fpr, pro = pro_curve(pixels.normal, pixels.region_weight, pixels.n_regions)
        return {
            "image_roc": roc_curve(image_points(scores, labels)),
            "pixel_roc": roc_curve(pixel_points(pixels)),
            "pro": truncate_curve(fpr, pro, self.fpr_limit) if fpr.size else (fpr, pro),
        }

    # ---- distributed use ---------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Plain, picklable state (numpy arrays, lists, numbers) to send from a worker."""
        return {
            "format": STATE_FORMAT,
            "num_bins": self.num_bins,
            "fpr_limit": self.fpr_limit,
            "track_defect_types": self.track_defect_types,
            "categories": {name: state.state_dict() for name, state in self._categories.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Replace this evaluator's data by `state` (made with the same settings)."""
        self._check_compatible(_settings_of(state), "state")
        self._categories = {
            name: _CategoryState.from_state_dict(category, self.num_bins)
            for name, category in state["categories"].items()
        }

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> "AnomalyEvaluator":
        num_bins, fpr_limit, track = _settings_of(state)
        evaluator = cls(num_bins=num_bins, fpr_limit=fpr_limit, track_defect_types=track)
        evaluator.load_state_dict(state)
        return evaluator

    def merge(self, other: "AnomalyEvaluator") -> None:
        """Add all data of `other` (same settings) to this evaluator; `other` is unchanged."""
        if not isinstance(other, AnomalyEvaluator):
            raise MetricsError(f"merge: expected an AnomalyEvaluator, got {type(other).__name__}")
        self._check_compatible((other.num_bins, other.fpr_limit, other.track_defect_types), "merge")
        for name, state in other._categories.items():
            self._categories.setdefault(name, _CategoryState(self.num_bins)).merge(state)

    # ---- internals -----------------------------------------------------------------------------
    def _split(self, batch: EvalBatch) -> dict[tuple[str, str], np.ndarray]:
        """Positions of the batch's images for each (category, group)."""
        keys = list(zip(batch.categories, self._groups(batch)))
        positions: dict[tuple[str, str], list[int]] = {}
        for index, key in enumerate(keys):
            positions.setdefault(key, []).append(index)
        return {key: np.asarray(indices) for key, indices in positions.items()}

    def _groups(self, batch: EvalBatch) -> list[str]:
        if not self.track_defect_types:
            return [_ALL] * len(batch)
        if batch.defect_types is None:
            raise MetricsError("defect_types: required when the evaluator tracks defect types")
        groups = []
        for index, (anomalous, defect) in enumerate(zip(batch.labels, batch.defect_types)):
            if anomalous and defect == GOOD:
                raise MetricsError(f"defect_types: image {index} of the batch is '{GOOD}' but its label is 1")
            groups.append(defect if anomalous else GOOD)
        return groups

    def _state(self, category: str) -> _CategoryState:
        if category not in self._categories:
            known = ", ".join(self.categories) or "none yet"
            raise MetricsError(f"category '{category}': not evaluated (known: {known})")
        return self._categories[category]

    def _check_compatible(self, settings: tuple[int, float, bool], source: str) -> None:
        mine = (self.num_bins, self.fpr_limit, self.track_defect_types)
        if tuple(settings) != mine:
            raise MetricsError(
                f"{source}: settings (num_bins, fpr_limit, track_defect_types) = {tuple(settings)} "
                f"differ from this evaluator's {mine}"
            )


def _take(values: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """values[positions], without a copy when the positions are the whole batch in order."""
    if positions.size == values.shape[0] and positions[-1] == positions.size - 1:
        return values
    return values[positions]


def _mean_over(per_category: Iterable[dict[str, float]]) -> dict[str, float]:
    """Unweighted mean over categories of each metric, leaving out nan values."""
    rows = list(per_category)
    mean = {}
    for key in METRIC_KEYS:
        values = [row[key] for row in rows if not math.isnan(row[key])]
        mean[key] = float(np.mean(values)) if values else float("nan")
    return mean


def _settings_of(state: dict[str, Any]) -> tuple[int, float, bool]:
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise MetricsError(f"state: not an AnomalyEvaluator state (expected format '{STATE_FORMAT}')")
    return int(state["num_bins"]), float(state["fpr_limit"]), bool(state["track_defect_types"])
