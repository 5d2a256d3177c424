"""Leak-free validation: a labelled split carved from the normal *training* images, never from test.

`split_validation` holds out a deterministic share of each category's normal train images.
`ValidationDataset` pastes synthetic defects (the shared `defects.DEFECTS` library, applied at the
model resolution so masks are exact) into a deterministic share of them, so thresholds,
normalisation statistics and model selection never see the test set.
`build_splits` puts train / val / test together from a dataset root and a `DataConfig`.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from dcad.core.data.dataset import AnomalyDataset, load_pair, resize_image, resize_mask
from dcad.core.data.defects import DEFECTS
from dcad.core.data.records import NORMAL, DatasetIndex, Record, open_dataset

if TYPE_CHECKING:
    from dcad.core.config import DataConfig


def _round(x: float) -> int:
    return int(math.floor(x + 0.5))


def _key(text: str) -> int:
    return zlib.crc32(text.encode("utf-8"))


def _by_category(records: list[Record]) -> dict[str, list[int]]:
    groups: dict[str, list[int]] = {}
    for i, record in enumerate(records):
        groups.setdefault(record.category, []).append(i)
    return groups


def split_validation(train: list[Record], fraction: float, seed: int) -> tuple[list[Record], list[Record]]:
    """(train_rest, val): per category, round(fraction·n) images (at least 1, leaving at least 1) go to val.

    The choice depends only on the records' paths, the fraction and the seed (not on input order);
    a category with a single image keeps it in train. Both lists keep the input order.
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"validation fraction must be in (0, 1), got {fraction}")
    held_out: set[int] = set()
    for category, indices in _by_category(train).items():
        if len(indices) < 2:
            continue
        ordered = sorted(indices, key=lambda i: train[i].image_path.as_posix())
        n_val = min(max(_round(fraction * len(ordered)), 1), len(ordered) - 1)
        perm = np.random.default_rng([seed, _key(category)]).permutation(len(ordered))
        held_out.update(ordered[j] for j in perm[:n_val])
    rest = [r for i, r in enumerate(train) if i not in held_out]
    val = [r for i, r in enumerate(train) if i in held_out]
    return rest, val


class ValidationDataset(AnomalyDataset):
    """Held-out normal images; a deterministic `anomaly_fraction` per category gets a pasted defect.

    Items have the `AnomalyDataset` format; a defective item has label 1, its exact mask and
    `defect_type` = the defect's name. Which items get which defect, and how it looks, depend only on
    (records, categories' names, anomaly_fraction, seed), never on access order.
    """

    def __init__(self, records: list[Record], categories: list[str], image_size: int,
                 anomaly_fraction: float = 0.5, seed: int = 0) -> None:
        super().__init__(records, categories, image_size)
        if not 0.0 <= anomaly_fraction <= 1.0:
            raise ValueError(f"anomaly_fraction must be in [0, 1], got {anomaly_fraction}")
        self.anomaly_fraction = anomaly_fraction
        self.seed = seed
        self.plan = self._plan()

    def _plan(self) -> list[str]:
        """Defect name (or 'good') of every item."""
        plan = [r.defect_type for r in self.records]
        names = sorted(DEFECTS)
        for category, indices in _by_category(self.records).items():
            candidates = [i for i in indices if self.records[i].label == 0]
            rng = np.random.default_rng([self.seed, _key(category), 1])
            chosen = rng.permutation(len(candidates))[: _round(self.anomaly_fraction * len(candidates))]
            order = rng.permutation(len(names))
            for j, c in enumerate(sorted(chosen)):
                plan[candidates[c]] = names[order[j % len(names)]]
        return plan

    @property
    def labels(self) -> list[int]:
        return [0 if name == NORMAL else 1 for name in self.plan]

    def __getitem__(self, index: int) -> dict[str, Any]:
        record, defect = self.records[index], self.plan[index]
        image, mask = load_pair(record)
        image_t, mask_t = resize_image(image, self.image_size), resize_mask(mask, self.image_size)
        if record.label == 1 or defect == NORMAL:
            return self.sample(record, image_t, mask_t, record.label, record.defect_type)
        rng = np.random.default_rng([self.seed, _key(record.category), 2, index])
        defective, pasted = DEFECTS[defect](image_t.permute(1, 2, 0).numpy(), rng)
        image_t = torch.from_numpy(np.ascontiguousarray(defective.transpose(2, 0, 1), dtype=np.float32))
        mask_t = torch.from_numpy(pasted.astype(np.float32))[None]
        return self.sample(record, image_t, mask_t, 1, defect)


@dataclass
class Splits:
    """Train (normal, minus validation), labelled validation (from normal train) and test datasets."""

    index: DatasetIndex
    categories: list[str]
    train: AnomalyDataset
    val: ValidationDataset
    test: AnomalyDataset


def build_splits(root: str | Path, data_cfg: DataConfig, layout: str = "auto") -> Splits:
    """Open the dataset and build the three splits from the config's size, fractions and seed."""
    index = open_dataset(root, layout, data_cfg.categories)
    rest, val = split_validation(index.train, data_cfg.val_fraction, data_cfg.val_seed)
    size, cats = data_cfg.image_size, index.categories
    return Splits(
        index=index,
        categories=cats,
        train=AnomalyDataset(rest, cats, size),
        val=ValidationDataset(val, cats, size, data_cfg.val_anomaly_fraction, data_cfg.val_seed),
        test=AnomalyDataset(index.test, cats, size),
    )
