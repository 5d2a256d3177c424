"""Checking and converting one batch of evaluator inputs (numpy arrays or torch tensors)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from dcad.core.errors import MetricsError


@dataclass(frozen=True)
class EvalBatch:
    """One checked batch: B images with (H, W) maps."""

    image_scores: np.ndarray  # (B,) float
    labels: np.ndarray  # (B,) bool, True = anomalous image
    anomaly_maps: np.ndarray  # (B, H, W) float32 or float64
    masks: np.ndarray  # (B, H, W) bool, True = anomalous pixel
    categories: list[str]
    defect_types: list[str] | None

    def __len__(self) -> int:
        return int(self.labels.size)


def to_numpy(value: Any, name: str) -> np.ndarray:
    """A numpy view/copy of a numpy array, torch tensor (any device) or nested sequence."""
    if hasattr(value, "detach") and hasattr(value, "cpu"):  # a torch tensor, without importing torch
        tensor = value.detach().cpu()
        if tensor.is_floating_point() and tensor.dtype.itemsize < 4:
            tensor = tensor.float()  # float16 / bfloat16 have no exact numpy counterpart
        return tensor.numpy()
    try:
        return np.asarray(value)
    except (TypeError, ValueError) as err:
        raise MetricsError(f"{name}: cannot be read as an array ({err})") from None


def check_batch(
    image_scores: Any,
    labels: Any,
    anomaly_maps: Any,
    masks: Any,
    categories: Sequence[str] | str,
    defect_types: Sequence[str] | None,
) -> EvalBatch:
    """Convert and validate one batch; raise MetricsError naming the argument that is wrong."""
    scores = check_scores(image_scores)
    size = scores.size
    label_flags = check_labels(labels, size)
    maps = _as_float(_stack(anomaly_maps, "anomaly_maps", size), "anomaly_maps")
    mask_flags = _binary(_stack(masks, "masks", size), "masks")
    if mask_flags.shape != maps.shape:
        raise MetricsError(f"masks: shape {mask_flags.shape} differs from anomaly_maps {maps.shape}")
    _check_normal_images_have_empty_masks(label_flags, mask_flags)
    names = _names(categories, "categories", size)
    defects = None if defect_types is None else _names(defect_types, "defect_types", size)
    return EvalBatch(scores, label_flags, maps, mask_flags, names, defects)


def check_scores(image_scores: Any, name: str = "image_scores") -> np.ndarray:
    """(B,) float64 scores from (B,) or (B, 1) finite numbers."""
    scores = to_numpy(image_scores, name)
    if scores.ndim == 2 and scores.shape[1] == 1:
        scores = scores[:, 0]
    if scores.ndim != 1:
        raise MetricsError(f"{name}: expected shape (B,), got {scores.shape}")
    return _as_float(scores, name).astype(np.float64)


def check_labels(labels: Any, size: int, scores_name: str = "image_scores") -> np.ndarray:
    """(B,) bool labels (True = anomalous) from 0/1 or booleans."""
    values = to_numpy(labels, "labels").reshape(-1)
    if values.size != size:
        raise MetricsError(f"labels: {values.size} values for {size} {scores_name}")
    if values.dtype == bool:
        return values
    if not np.isin(values, (0, 1)).all():
        raise MetricsError(f"labels: must be 0 (normal) or 1 (anomalous), got {np.unique(values)[:5].tolist()}")
    return values.astype(bool)


def _stack(value: Any, name: str, size: int) -> np.ndarray:
    maps = to_numpy(value, name)
    if maps.ndim == 4 and maps.shape[1] == 1:
        maps = maps[:, 0]
    if maps.ndim != 3:
        raise MetricsError(f"{name}: expected shape (B, H, W) or (B, 1, H, W), got {maps.shape}")
    if maps.shape[0] != size:
        raise MetricsError(f"{name}: {maps.shape[0]} maps for {size} image_scores")
    return maps


def _binary(masks: np.ndarray, name: str) -> np.ndarray:
    if masks.dtype == bool:
        return masks
    if not np.issubdtype(masks.dtype, np.number) or np.iscomplexobj(masks):
        raise MetricsError(f"{name}: expected a boolean or numeric mask, got dtype {masks.dtype}")
    return masks > 0


def _as_float(values: np.ndarray, name: str) -> np.ndarray:
    if values.dtype == bool or not np.issubdtype(values.dtype, np.number) or np.iscomplexobj(values):
        raise MetricsError(f"{name}: expected real numbers, got dtype {values.dtype}")
    if values.dtype not in (np.float32, np.float64):
        values = values.astype(np.float64)
    finite = np.isfinite(values)
    if not finite.all():
        first = np.unravel_index(int(np.argmin(finite)), values.shape)[0]
        raise MetricsError(f"{name}: contains NaN or infinite values (image {first} of the batch)")
    return values


def _check_normal_images_have_empty_masks(labels: np.ndarray, masks: np.ndarray) -> None:
    marked = masks.any(axis=(1, 2)) & ~labels
    if marked.any():
        index = int(np.flatnonzero(marked)[0])
        raise MetricsError(f"masks: image {index} of the batch has anomalous pixels but its label is 0 (normal)")


def _names(names: Sequence[str] | str, argument: str, size: int) -> list[str]:
    if isinstance(names, str):
        return [names] * size  # one name for the whole batch
    names = [str(name) for name in names]
    if len(names) != size:
        raise MetricsError(f"{argument}: {len(names)} names for {size} images")
    return names
