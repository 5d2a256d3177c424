"""Backbone features of the training images, computed once and kept in memory (docs/design.md §6).

The backbone is frozen, so re-running it at every step only burns time: the base branch trains on
this cache for thousands of iterations in the time a few hundred image steps would take.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from dcad.core.errors import DatasetError
from dcad.core.model.backbone import FeatureExtractor

FLOAT16_ABOVE_BYTES = 2 * 1024**3  # caches larger than this (in float32) are stored as float16


@dataclass(eq=False)
class FeatureCache(Dataset):
    """features [N,C,h,w] and category_index [N]; items are float32 feature tensors [C,h,w]."""

    features: Tensor
    category_index: Tensor
    categories: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return int(self.features.shape[0])

    def __getitem__(self, index: int) -> Tensor:
        return self.features[index].float()

    @property
    def channels(self) -> int:
        return int(self.features.shape[1])

    @property
    def grid(self) -> tuple[int, int]:
        return int(self.features.shape[2]), int(self.features.shape[3])

    def category_prototypes(self, num_categories: int) -> Tensor:
        """[K, C]: mean pooled feature of each category (zeros for a category without images)."""
        pooled = self.features.float().mean(dim=(2, 3))
        sums = torch.zeros(num_categories, pooled.shape[1]).index_add_(0, self.category_index, pooled)
        counts = torch.bincount(self.category_index, minlength=num_categories).clamp(min=1)
        return sums / counts[:, None]


def _split_item(batch: Any) -> tuple[Tensor, Tensor]:
    """(images, category indices) from a collated batch: dict items, (image, index) pairs or bare images."""
    if isinstance(batch, dict):
        if "image" not in batch:
            raise DatasetError("dataset items must have an 'image' key to compute features")
        images = batch["image"]
        index = batch.get("category_index", torch.zeros(len(images), dtype=torch.long))
    elif isinstance(batch, (list, tuple)):
        images, index = batch[0], batch[1] if len(batch) > 1 else torch.zeros(len(batch[0]), dtype=torch.long)
    else:
        images, index = batch, torch.zeros(len(batch), dtype=torch.long)
    return images, torch.as_tensor(index, dtype=torch.long)


def compute_features(
    extractor: FeatureExtractor,
    dataset: Dataset,
    batch_size: int,
    device: torch.device | str,
    *,
    hflip: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> FeatureCache:
    """Run the frozen backbone once over `dataset` (with `hflip`, also over mirrored images: 2N items)."""
    if len(dataset) == 0:
        raise DatasetError("cannot compute features of an empty dataset")
    device = torch.device(device)
    extractor = extractor.to(device).eval()
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False)
    chunks, indices, done = [], [], 0
    for batch in loader:
        images, index = _split_item(batch)
        images = images.to(device)
        chunks.append(extractor(images).cpu())
        indices.append(index)
        if hflip:
            chunks.append(extractor(images.flip(-1)).cpu())
            indices.append(index)
        done += len(images)
        if progress is not None:
            progress(done, len(dataset))
    features = torch.cat(chunks)
    if features.numel() * 4 > FLOAT16_ABOVE_BYTES:
        features = features.half()
    categories = list(getattr(dataset, "categories", []) or [])
    return FeatureCache(features, torch.cat(indices), categories)
