"""The benchmark's data: a synthetic dataset per seed (cached on disk), its splits, and tensors in memory."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import Dataset

from dcad.core.config import DCADConfig
from dcad.core.data import CATEGORIES, build_splits, synthesize
from dcad.core.data.synth import MARKER
from dcad.core.inference import loader_for


@dataclass(frozen=True)
class SynthSpec:
    """Arguments of `dcad data synth` (seed apart); size None = the profile's image size, categories None = all."""

    size: int | None = None
    n_train: int = 40
    n_test: int = 30
    categories: tuple[str, ...] | None = None

    def folder_name(self, seed: int) -> str:
        cats = "all" if self.categories is None else "-".join(self.categories)
        return f"synth-s{seed}-{self.size}px-{self.n_train}-{self.n_test}-{cats}"


def synth_dataset(cache: Path, spec: SynthSpec, seed: int) -> Path:
    """The dataset for `seed` under `cache`, written by the generator unless an identical one is there."""
    root = cache / spec.folder_name(seed)
    marker = root / MARKER
    if marker.is_file():
        params = json.loads(marker.read_text())
        wanted = (seed, spec.size, spec.n_train, spec.n_test, list(spec.categories or CATEGORIES))
        if (params["seed"], params["size"], params["n_train"], params["n_test"], params["categories"]) == wanted:
            return root
    synthesize(root, seed=seed, size=spec.size, n_train=spec.n_train, n_test=spec.n_test,
               categories=list(spec.categories) if spec.categories else None, overwrite=True)
    return root


@dataclass
class InMemory:
    """A split as tensors: images [N,3,H,W], masks [N,H,W], labels [N], category and defect type names."""

    images: torch.Tensor
    masks: torch.Tensor
    labels: torch.Tensor
    categories: list[str]
    defect_types: list[str]

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def subset(self, indices: list[int]) -> "InMemory":
        return InMemory(self.images[indices], self.masks[indices], self.labels[indices],
                        [self.categories[i] for i in indices], [self.defect_types[i] for i in indices])


def load_split(dataset: Dataset, batch_size: int = 32) -> InMemory:
    images, masks, labels, cats, defects = [], [], [], [], []
    for batch in loader_for(dataset, batch_size):
        images.append(batch["image"])
        masks.append(batch["mask"][:, 0])
        labels.append(batch["label"])
        cats += list(batch["category"])
        defects += list(batch["defect_type"])
    return InMemory(torch.cat(images), torch.cat(masks), torch.cat(labels), cats, defects)


@dataclass
class SeedData:
    root: Path
    splits: object  # dcad.core.data.Splits
    train: InMemory
    test: InMemory


def prepare(cache: Path, spec: SynthSpec, seed: int, cfg: DCADConfig) -> SeedData:
    root = synth_dataset(cache, spec, seed)
    splits = build_splits(root, cfg.data)
    return SeedData(root, splits, load_split(splits.train), load_split(splits.test))
