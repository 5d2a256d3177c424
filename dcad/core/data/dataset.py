"""Torch dataset over records: resized image, mask, label and category of every sample."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from dcad.core.data.images import load_image, load_mask
from dcad.core.data.records import Record
from dcad.core.errors import DatasetError


def resize_image(image: np.ndarray, size: int) -> torch.Tensor:
    """uint8 H×W×3 -> float32 [3, size, size] in [0, 1] (bilinear, antialiased)."""
    tensor = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float().div_(255.0)
    if tensor.shape[1:] != (size, size):
        tensor = F.interpolate(tensor[None], size=(size, size), mode="bilinear", antialias=True, align_corners=False)[0]
    return tensor.clamp_(0.0, 1.0)


def resize_mask(mask: np.ndarray, size: int) -> torch.Tensor:
    """bool H×W -> float32 [1, size, size] in {0, 1} (nearest)."""
    tensor = torch.from_numpy(np.ascontiguousarray(mask)).float()[None]
    if tensor.shape[1:] != (size, size):
        tensor = F.interpolate(tensor[None], size=(size, size), mode="nearest")[0]
    return tensor


def load_pair(record: Record) -> tuple[np.ndarray, np.ndarray]:
    """The record's image and its mask (all False for a normal image); DatasetError on a size mismatch."""
    image = load_image(record.image_path)
    if record.mask_path is None:
        return image, np.zeros(image.shape[:2], dtype=bool)
    mask = load_mask(record.mask_path)
    if mask.shape != image.shape[:2]:
        raise DatasetError(
            f"{record.mask_path}: mask size {mask.shape[1]}x{mask.shape[0]} does not match "
            f"image {record.image_path} ({image.shape[1]}x{image.shape[0]})"
        )
    return image, mask


def category_indices(categories: list[str]) -> dict[str, int]:
    return {name: i for i, name in enumerate(categories)}


class AnomalyDataset(Dataset):
    """Samples as dicts: image [3,S,S], mask [1,S,S], label, category, category_index, defect_type, path."""

    def __init__(self, records: list[Record], categories: list[str], image_size: int) -> None:
        if image_size < 1:
            raise ValueError(f"image_size must be positive, got {image_size}")
        self.records = list(records)
        self.categories = list(categories)
        self.image_size = int(image_size)
        self._index = category_indices(self.categories)
        missing = sorted({r.category for r in self.records} - set(self._index))
        if missing:
            raise DatasetError(f"records of categories {', '.join(missing)} not in the category list {self.categories}")

    def __len__(self) -> int:
        return len(self.records)

    @property
    def labels(self) -> list[int]:
        return [r.label for r in self.records]

    def sample(
        self, record: Record, image: torch.Tensor, mask: torch.Tensor, label: int, defect: str
    ) -> dict[str, Any]:
        """The item dict for `record` with the given (already resized) image and mask."""
        return {
            "image": image,
            "mask": mask,
            "label": int(label),
            "category": record.category,
            "category_index": self._index[record.category],
            "defect_type": defect,
            "path": str(record.image_path),
        }

    def __getitem__(self, index: int) -> dict[str, Any]:
        record = self.records[index]
        image, mask = load_pair(record)
        size = self.image_size
        return self.sample(record, resize_image(image, size), resize_mask(mask, size), record.label, record.defect_type)
