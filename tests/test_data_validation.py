"""AnomalyDataset items, the leak-free validation split and build_splits."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dcad.core.config import DataConfig
from dcad.core.data import (
    DEFECTS,
    AnomalyDataset,
    ValidationDataset,
    build_splits,
    open_dataset,
    split_validation,
    synthesize,
)
from dcad.core.errors import DatasetError

CATS = ["brick", "capsule", "gear"]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("val") / "synth"
    synthesize(root, seed=3, size=64, categories=CATS, n_train=10, n_test=6)
    return root


def _items(ds) -> list[dict]:
    return [ds[i] for i in range(len(ds))]


def test_dataset_item_format(data: Path) -> None:
    index = open_dataset(data)
    ds = AnomalyDataset(index.test, index.categories, image_size=32)
    for item, record in zip(_items(ds), index.test):
        assert item["image"].shape == (3, 32, 32) and item["image"].dtype == torch.float32
        assert item["image"].min() >= 0.0 and item["image"].max() <= 1.0
        assert item["mask"].shape == (1, 32, 32) and set(item["mask"].unique().tolist()) <= {0.0, 1.0}
        assert item["label"] == record.label and item["defect_type"] == record.defect_type
        assert index.categories[item["category_index"]] == item["category"] == record.category
        assert item["path"] == str(record.image_path)
        assert bool(item["mask"].any()) == bool(record.label)


def test_dataset_size_mismatch_names_both_files(tmp_path: Path, data: Path) -> None:
    index = open_dataset(data)
    record = next(r for r in index.test if r.label == 1)
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(tmp_path / "small_mask.png")
    bad = type(record)(record.image_path, record.category, "test", 1, record.defect_type, tmp_path / "small_mask.png")
    ds = AnomalyDataset([bad], index.categories, 32)
    message = rf"small_mask\.png: mask size 10x10 does not match image {record.image_path}"
    with pytest.raises(DatasetError, match=message):
        ds[0]


def test_split_is_disjoint_deterministic_and_per_category(data: Path) -> None:
    train = open_dataset(data).train
    rest, val = split_validation(train, 0.2, seed=5)
    assert set(rest).isdisjoint(val) and set(rest) | set(val) == set(train)
    for cat in CATS:
        assert sum(r.category == cat for r in val) == 2  # 20 % of 10
    again_rest, again_val = split_validation(list(reversed(train)), 0.2, seed=5)
    assert set(again_val) == set(val) and set(again_rest) == set(rest)
    assert set(split_validation(train, 0.2, seed=6)[1]) != set(val)


def test_split_keeps_at_least_one_image_on_each_side(data: Path) -> None:
    train = open_dataset(data).train
    tiny = [r for r in train if r.category == "brick"][:2] + [r for r in train if r.category == "gear"][:1]
    rest, val = split_validation(tiny, 0.05, seed=0)
    assert [r.category for r in val] == ["brick"]
    assert sorted(r.category for r in rest) == ["brick", "gear"]
    rest, val = split_validation(tiny, 0.95, seed=0)
    assert sum(r.category == "brick" for r in rest) == 1


def test_validation_dataset_anomaly_fraction_and_masks(data: Path) -> None:
    index = open_dataset(data)
    val = ValidationDataset(index.train, index.categories, 48, anomaly_fraction=0.3, seed=1)
    items = _items(val)
    for cat in CATS:
        labels = [it["label"] for it in items if it["category"] == cat]
        assert sum(labels) == 3  # 30 % of 10
    for it in items:
        assert it["mask"].shape == (1, 48, 48)
        assert bool(it["mask"].any()) == (it["label"] == 1)
        assert (it["defect_type"] in DEFECTS) == (it["label"] == 1)
    assert [it["label"] for it in items] == val.labels


def test_validation_defects_change_the_image_only_under_the_mask(data: Path) -> None:
    index = open_dataset(data)
    plain = AnomalyDataset(index.train, index.categories, 48)
    val = ValidationDataset(index.train, index.categories, 48, anomaly_fraction=1.0, seed=2)
    for i in range(0, len(val), 4):
        clean, defective = plain[i], val[i]
        change = (defective["image"] - clean["image"]).abs().amax(dim=0)
        mask = defective["mask"][0].bool()
        grown = torch.nn.functional.max_pool2d(mask[None, None].float(), 5, 1, 2)[0, 0].bool()
        assert mask.any() and not (change[~grown] > 0.01).any()


def test_validation_output_is_independent_of_access_order(data: Path) -> None:
    index = open_dataset(data)
    first = ValidationDataset(index.train, index.categories, 40, seed=4)
    second = ValidationDataset(index.train, index.categories, 40, seed=4)
    forward = _items(first)
    backward = [second[i] for i in reversed(range(len(second)))][::-1]
    for a, b in zip(forward, backward):
        assert a["defect_type"] == b["defect_type"]
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["mask"], b["mask"])
    other = ValidationDataset(index.train, index.categories, 40, seed=5)
    assert other.plan != first.plan


def test_build_splits_never_uses_test_images(data: Path) -> None:
    cfg = DataConfig(image_size=32, val_fraction=0.3, val_seed=0, val_anomaly_fraction=0.5,
                     categories=["brick", "gear"])
    splits = build_splits(data, cfg)
    assert splits.categories == ["brick", "gear"]
    test_paths = {r.image_path for r in splits.index.test}
    train_paths = {r.image_path for r in splits.train.records}
    val_paths = {r.image_path for r in splits.val.records}
    assert val_paths and train_paths and train_paths.isdisjoint(val_paths)
    assert not (val_paths | train_paths) & test_paths
    assert all(r.split == "train" and r.label == 0 for r in splits.val.records)
    assert len(splits.val) == 6 and sum(splits.val.labels) == 4  # 3 per category, half of 3 rounds to 2
    assert {r.category for r in splits.test.records} == {"brick", "gear"}
