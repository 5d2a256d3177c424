"""`dcad data check`: decode every file of a dataset and summarise it, or fail on the first problem."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from pathlib import Path

from dcad.core.data.images import load_image, load_mask
from dcad.core.data.records import NORMAL, Record, open_dataset
from dcad.core.errors import DatasetError

Progress = Callable[[int, int], None]  # (done, total)


def _check_record(record: Record) -> tuple[tuple[int, int], float | None]:
    """Decode the image (and mask); returns (image H, W) and the mask's anomalous fraction."""
    image = load_image(record.image_path)
    size = image.shape[:2]
    if record.mask_path is None:
        return size, None
    mask = load_mask(record.mask_path)
    if mask.shape != size:
        raise DatasetError(
            f"{record.mask_path}: mask size {mask.shape[1]}x{mask.shape[0]} does not match "
            f"image {record.image_path} ({size[1]}x{size[0]})"
        )
    return size, float(mask.mean())


def check_dataset(root: str | Path, layout: str = "auto", progress: Progress | None = None) -> dict:
    """Validate every image and mask under `root`; a summary dict, or DatasetError naming the bad file.

    Returns {"root", "layout", "digest", "categories": {cat: {"train": n, "test": {defect: n},
    "mask_coverage": mean anomalous fraction of the test masks, "empty_masks": n, "sizes": ["WxH", ...]}},
    "totals": {"categories", "train", "test", "test_good", "test_anomalous", "masks", "images"}}.
    """
    index = open_dataset(root, layout)
    records = index.records
    stats: dict[str, dict] = {
        cat: {"train": 0, "test": Counter(), "coverage": [], "sizes": set()} for cat in index.categories
    }
    for done, record in enumerate(records, start=1):
        size, coverage = _check_record(record)
        entry = stats[record.category]
        entry["sizes"].add(f"{size[1]}x{size[0]}")
        if record.split == "train":
            entry["train"] += 1
        else:
            entry["test"][record.defect_type] += 1
        if coverage is not None:
            entry["coverage"].append(coverage)
        if progress is not None:
            progress(done, len(records))
    categories = {cat: _summarise(entry) for cat, entry in stats.items()}
    return {
        "root": str(index.root),
        "layout": index.layout,
        "digest": index.digest(),
        "categories": categories,
        "totals": _totals(index.train, index.test),
    }


def _summarise(entry: dict) -> dict:
    test = entry["test"]
    ordered = {NORMAL: test[NORMAL]} if NORMAL in test else {}
    ordered.update({k: test[k] for k in sorted(test) if k != NORMAL})
    cov = entry["coverage"]
    return {
        "train": entry["train"],
        "test": ordered,
        "mask_coverage": round(sum(cov) / len(cov), 6) if cov else 0.0,
        "empty_masks": sum(1 for c in cov if c == 0.0),
        "sizes": sorted(entry["sizes"]),
    }


def _totals(train: list[Record], test: list[Record]) -> dict:
    anomalous = sum(r.label for r in test)
    return {
        "categories": len({r.category for r in [*train, *test]}),
        "train": len(train),
        "test": len(test),
        "test_good": len(test) - anomalous,
        "test_anomalous": anomalous,
        "masks": sum(1 for r in test if r.mask_path is not None),
        "images": len(train) + len(test),
    }
