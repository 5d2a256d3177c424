"""A bounded-memory histogram of pixel scores, exact enough for AUROC, AP, F1-max and AUPRO.

Bins have a power-of-two width `2**exponent` and are aligned to multiples of it: a score s falls
in the bin with absolute index floor(s / 2**exponent). Only *occupied* bins are stored (sorted
indices with their counts), and at most `max_bins` of them. When more bins are occupied, the
width doubles as often as needed (pairs of bins merge exactly: index k becomes k >> 1). Hence:

- memory is bounded (4 arrays of at most `max_bins`), whatever the number of pixels;
- the width is always the finest for which the occupied bins of *all* scores seen fit in
  `max_bins`, so the result does not depend on batch order, and two histograms merge exactly
  (`merge` of two workers' histograms equals one histogram over all the data);
- far outliers cost one bin each instead of stretching a fixed grid; scores with few distinct
  values (quantised maps) are kept exactly;
- pixels with different scores in the same bin count as tied: that is the only approximation.

Per bin it counts normal pixels, anomalous pixels, and the sum over anomalous pixels of
1 / |region| (the AUPRO weight); it also counts the ground-truth regions seen.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from dcad.core.errors import MetricsError

_INDEX_BITS = 61  # |score| / 2**exponent stays below 2**61, so bin indices fit in int64
_CHANNELS = ("normal", "anomalous", "region_weight")


class PixelHistogram:
    """Counts of normal / anomalous pixels and AUPRO region weights per occupied score bin."""

    def __init__(self, max_bins: int) -> None:
        self.max_bins = int(max_bins)
        self.exponent: int | None = None  # bin width is 2**exponent; None while empty
        self.index = np.zeros(0, np.int64)  # sorted absolute indices of the occupied bins
        self.normal = np.zeros(0, np.int64)
        self.anomalous = np.zeros(0, np.int64)
        self.region_weight = np.zeros(0, np.float64)
        self.n_regions = 0

    @property
    def is_empty(self) -> bool:
        return self.exponent is None

    def add(self, scores: np.ndarray, anomalous: np.ndarray, anomalous_weight: np.ndarray, n_regions: int) -> None:
        """Add pixels: finite `scores`, a same-shape boolean `anomalous` mask, and 1/|region| of
        each anomalous pixel (in the C order of `scores[anomalous]`)."""
        scores = scores.ravel()
        if scores.size == 0:
            return
        floor = _exponent_floor(float(scores.min()), float(scores.max()))
        if self.is_empty:  # the finest width for which these scores fit (sorting distinct scores only)
            self.exponent = floor + _shift_to_fit(_bin_index(np.unique(scores), floor), self.max_bins)
        self._coarsen_by(floor - self.exponent)
        index = _bin_index(scores, self.exponent)
        self._absorb(*_tally(index, anomalous.ravel(), anomalous_weight, self.max_bins))
        self.n_regions += int(n_regions)

    def merge(self, other: "PixelHistogram") -> None:
        """Add every count of `other` into this histogram; `other` is unchanged."""
        if other.is_empty:
            return
        if self.is_empty:
            self._load(other.state_dict())
            return
        other = other.copy()
        exponent = max(self.exponent, other.exponent)
        self._coarsen_by(exponent - self.exponent)
        other._coarsen_by(exponent - other.exponent)
        self._absorb(other.index, other.normal, other.anomalous, other.region_weight)
        self.n_regions += other.n_regions

    def lower_edges(self) -> np.ndarray:
        """Score at the lower edge of each occupied bin (the threshold that bin stands for)."""
        return np.ldexp(self.index.astype(np.float64), self.exponent or 0)

    def copy(self) -> "PixelHistogram":
        return PixelHistogram.from_state_dict(self.state_dict())

    def state_dict(self) -> dict[str, Any]:
        """Plain, picklable state (at most `max_bins` entries per array)."""
        arrays = {name: getattr(self, name).copy() for name in ("index", *_CHANNELS)}
        return {"max_bins": self.max_bins, "exponent": self.exponent, "n_regions": self.n_regions, **arrays}

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> "PixelHistogram":
        histogram = cls(int(state["max_bins"]))
        histogram._load(state)
        return histogram

    # ---- internals ---------------------------------------------------------------------------
    def _absorb(self, index: np.ndarray, normal: np.ndarray, anomalous: np.ndarray, weight: np.ndarray) -> None:
        """Add sparse tallies at the current exponent, then widen bins until they fit."""
        merged_index = np.concatenate([self.index, index])
        order = np.argsort(merged_index, kind="stable")
        channels = [np.concatenate(pair)[order] for pair in zip(self._channels(), (normal, anomalous, weight))]
        self._set(*_sum_runs(merged_index[order], channels))
        self._coarsen_by(_shift_to_fit(self.index, self.max_bins))

    def _coarsen_by(self, shift: int) -> None:
        """Widen bins by 2**shift, merging the bins that now coincide."""
        if shift <= 0 or self.is_empty:
            return
        self.exponent += shift
        self._set(*_sum_runs(self.index >> shift, list(self._channels())))

    def _channels(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return self.normal, self.anomalous, self.region_weight

    def _set(self, index: np.ndarray, channels: list[np.ndarray]) -> None:
        self.index = index
        self.normal, self.anomalous, self.region_weight = channels

    def _load(self, state: dict[str, Any]) -> None:
        self.exponent = None if state["exponent"] is None else int(state["exponent"])
        self.n_regions = int(state["n_regions"])
        self.index = np.asarray(state["index"], np.int64).copy()
        self.normal = np.asarray(state["normal"], np.int64).copy()
        self.anomalous = np.asarray(state["anomalous"], np.int64).copy()
        self.region_weight = np.asarray(state["region_weight"], np.float64).copy()
        if self.index.size > self.max_bins:
            raise MetricsError(f"state: histogram has {self.index.size} bins, more than max_bins={self.max_bins}")


def _exponent_floor(low: float, high: float) -> int:
    """Smallest exponent for which floor(s / 2**exponent) of these scores fits in int64."""
    magnitude = max(abs(low), abs(high))
    if magnitude == 0.0:
        return -1074 + _INDEX_BITS  # all zeros: any width works
    return math.frexp(magnitude)[1] - _INDEX_BITS


def _bin_index(scores: np.ndarray, exponent: int) -> np.ndarray:
    """Absolute bin index floor(s / 2**exponent) of each score (exact: a power-of-two scaling)."""
    scaled = np.ldexp(scores, -exponent)
    return np.floor(scaled, out=scaled).astype(np.int64)


def _tally(
    index: np.ndarray, anomalous: np.ndarray, anomalous_weight: np.ndarray, max_bins: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Occupied bins of one batch of bin indices: (index, normal, anomalous, region weight)."""
    low, high = int(index.min()), int(index.max())
    if high - low < max(4 * max_bins, index.size):  # dense counting over the batch's span
        position, bins = index, None
        position -= low  # in place: `index` is a temporary of the caller
    else:  # sparse (far outliers or very fine bins): sort the indices instead
        bins, position = np.unique(index, return_inverse=True)
    size = high - low + 1 if bins is None else bins.size
    anomalous_position = position[anomalous]
    total = np.bincount(position, minlength=size)
    counts_anomalous = np.bincount(anomalous_position, minlength=size)
    weight = np.bincount(anomalous_position, weights=anomalous_weight, minlength=size)
    occupied = np.flatnonzero(total)
    bins = occupied + low if bins is None else bins
    return bins, (total - counts_anomalous)[occupied], counts_anomalous[occupied], weight[occupied]


def _sum_runs(index: np.ndarray, channels: list[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
    """Collapse equal neighbours of a sorted index, summing each channel over them."""
    if index.size == 0:
        return index, channels
    starts = np.flatnonzero(np.diff(index, prepend=index[0] - 1))
    return index[starts], [np.add.reduceat(channel, starts) for channel in channels]


def _occupied_after(index: np.ndarray, shift: int) -> int:
    shifted = index >> shift
    return int(np.count_nonzero(np.diff(shifted))) + 1


def _shift_to_fit(index: np.ndarray, max_bins: int) -> int:
    """Smallest shift after which the sorted `index` occupies at most `max_bins` bins."""
    if index.size <= max_bins or _occupied_after(index, 0) <= max_bins:
        return 0
    low, high = 0, max(int(index[-1]) - int(index[0]), 1).bit_length()  # `high` always fits
    while high - low > 1:  # invariant: `low` does not fit, `high` fits
        middle = (low + high) // 2
        low, high = (low, middle) if _occupied_after(index, middle) <= max_bins else (middle, high)
    return high
