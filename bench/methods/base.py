"""The interface every benchmarked method implements, and the data it is fitted on.

    method.fit(data)                                   # normal training images (+ validation split)
    scores, maps = method.predict(images, categories)  # [B] and [B,H,W] at image size

Images are float [B,3,H,W] in [0,1] at the profile's size; `categories` is one name per image (the
benchmark, like `dcad eval`, gives the category; a method with one model for all may ignore it).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import Tensor
from torch.utils.data import Dataset

from dcad.core.config import DCADConfig


@dataclass
class FitData:
    """What a method may learn from: normal train images in memory, the validation split, the config."""

    cfg: DCADConfig
    images: Tensor  # [N,3,H,W] float in [0,1]: the normal training images (validation held out)
    categories: list[str]  # one per image
    category_names: list[str]  # every category of the dataset, in the dataset's order
    val: Dataset  # labelled validation split carved from normal train images (for statistics)
    splits: object  # dcad.core.data.Splits, for methods that train through the project's pipeline
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    seed: int = 0


@dataclass(frozen=True)
class MethodInfo:
    """How a method is set up, for the tables."""

    description: str
    multi_class: bool  # one model for every category
    note: str = ""
    budget_curve: bool = False  # a point of DRDC's refinement-budget curve only (left out of the main tables)


class Method(Protocol):
    name: str
    info: MethodInfo
    batch_size: int  # preferred inference batch (capped by the suite)

    def fit(self, data: FitData) -> None:
        """Learn from normal images. A method whose model is trained elsewhere (shared with another method)
        also sets `training` (a `bench.measure.Measurement`) to that training's time and memory."""

    def predict(self, images: Tensor, categories: list[str]) -> tuple[Tensor, Tensor]:
        """(image scores [B], anomaly maps [B,H,W]) for images [B,3,H,W]."""


def by_category(categories: list[str]) -> dict[str, list[int]]:
    """Positions of each category's items, in order."""
    groups: dict[str, list[int]] = {}
    for i, name in enumerate(categories):
        groups.setdefault(name, []).append(i)
    return groups


def upsample(patch_scores: Tensor, size: int) -> Tensor:
    """[B,h,w] → [B,size,size] (bilinear)."""
    return torch.nn.functional.interpolate(
        patch_scores.unsqueeze(1), size=(size, size), mode="bilinear", align_corners=False
    ).squeeze(1)


@torch.no_grad()
def backbone_features(extractor: torch.nn.Module, images: Tensor, batch_size: int = 32) -> Tensor:
    """The frozen backbone's feature grid [N,C,h,w] of images [N,3,H,W], in batches."""
    return torch.cat([extractor(images[i : i + batch_size]) for i in range(0, len(images), batch_size)])
