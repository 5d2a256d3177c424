"""The synthetic benchmark generator (`dcad data synth`): an MVTec-layout dataset fully set by its seed.

Output: ``OUT/<cat>/train/good/NNN.png``, ``OUT/<cat>/test/good/NNN.png``,
``OUT/<cat>/test/<defect>/NNN.png`` and ``OUT/<cat>/ground_truth/<defect>/NNN_mask.png`` (0/255),
plus ``OUT/dcad_synth.json`` describing the arguments. Each image comes from its own generator
seeded by (seed, category, split, index), so one category's files do not depend on which other
categories are generated, and the same arguments give byte-identical files.

Test sets hold about one third good images; the rest cycle through the category's defect types
(see `scenes.CATEGORY_LIST` for the categories and `defects` for the defect library).
"""

from __future__ import annotations

import json
import shutil
import time
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np

from dcad.core.data.defects import DEFECTS
from dcad.core.data.images import save_png
from dcad.core.data.records import NORMAL
from dcad.core.data.scenes import CATEGORY_LIST, CATEGORY_MAP, Category
from dcad.core.errors import DatasetError

CATEGORIES: list[str] = [c.name for c in CATEGORY_LIST]
MARKER = "dcad_synth.json"
DEFAULT_TRAIN = 40
DEFAULT_TEST = 30
MIN_SIZE, MAX_SIZE = 32, 1024
SPLIT_CODES = {"train": 0, "test": 1}

Progress = Callable[[str, int, int], None]  # (category, done, total)


def image_rng(seed: int, category: str, split: str, index: int) -> np.random.Generator:
    """The generator for one image: independent of every other image and category."""
    return np.random.default_rng([seed, zlib.crc32(category.encode()), SPLIT_CODES[split], index])


def defect_plan(category: Category, n_test: int) -> list[str]:
    """Defect type of every test image: the first ~third good, then the defects in turn."""
    n_good = int(round(n_test / 3))
    defects = [category.defects[i % len(category.defects)] for i in range(n_test - n_good)]
    return [NORMAL] * n_good + defects


def render_sample(
    category: Category, size: int, rng: np.random.Generator, defect: str
) -> tuple[np.ndarray, np.ndarray | None]:
    """One uint8 image (and its bool mask for a defect): clean render, defect, then sensor noise."""
    img = category.render(rng, size)
    mask = None
    if defect != NORMAL:
        img, mask = DEFECTS[defect](img, rng)
    noisy = img + rng.normal(0.0, category.noise, img.shape).astype(np.float32)
    return np.round(np.clip(noisy, 0.0, 1.0) * 255.0).astype(np.uint8), mask


def _check_args(seed: int, size: int, categories: list[str], n_train: int, n_test: int) -> None:
    if seed < 0:
        raise DatasetError(f"seed must be >= 0, got {seed}")
    if not MIN_SIZE <= size <= MAX_SIZE:
        raise DatasetError(f"size must be in [{MIN_SIZE}, {MAX_SIZE}] pixels, got {size}")
    unknown = [c for c in categories if c not in CATEGORY_MAP]
    if unknown or not categories:
        given = ", ".join(unknown) or "(none given)"
        noun = "category" if len(unknown) == 1 else "categories"
        raise DatasetError(f"unknown synthetic {noun} {given} (available: {', '.join(CATEGORIES)})")
    if n_train < 2:
        raise DatasetError(f"need at least 2 train images per category (one is held out for validation), got {n_train}")
    if n_test < 0:
        raise DatasetError(f"number of test images must be >= 0, got {n_test}")


def _prepare(out: Path, overwrite: bool) -> None:
    """Create OUT; refuse a non-empty one unless overwriting a previous synthetic dataset."""
    if out.exists() and not out.is_dir():
        raise DatasetError(f"{out}: exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise DatasetError(f"{out}: directory is not empty (use --overwrite to replace a synthetic dataset)")
        if not (out / MARKER).is_file():
            raise DatasetError(
                f"{out}: not empty and not written by `dcad data synth` (no {MARKER}); refusing to delete it"
            )
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)


class _Ticker:
    """Counts written images and reports them to an optional progress callback."""

    def __init__(self, total: int, progress: Progress | None) -> None:
        self.total, self.done, self.progress = total, 0, progress

    def __call__(self, category: str) -> None:
        self.done += 1
        if self.progress is not None:
            self.progress(category, self.done, self.total)


def _write_split(out: Path, category: Category, split: str, plan: list[str], size: int, seed: int,
                 tick: _Ticker) -> dict[str, int]:
    counts: dict[str, int] = {}
    for index, defect in enumerate(plan):
        image, mask = render_sample(category, size, image_rng(seed, category.name, split, index), defect)
        number = counts.get(defect, 0)
        counts[defect] = number + 1
        folder = out / category.name / split / defect
        folder.mkdir(parents=True, exist_ok=True)
        save_png(folder / f"{number:03d}.png", image)
        if mask is not None:
            mask_dir = out / category.name / "ground_truth" / defect
            mask_dir.mkdir(parents=True, exist_ok=True)
            save_png(mask_dir / f"{number:03d}_mask.png", mask)
        tick(category.name)
    return counts


def synthesize(
    out: str | Path,
    seed: int = 0,
    size: int = 128,
    categories: list[str] | None = None,
    n_train: int = DEFAULT_TRAIN,
    n_test: int = DEFAULT_TEST,
    overwrite: bool = False,
    progress: Progress | None = None,
) -> dict:
    """Write the synthetic benchmark under `out`; returns a summary (counts per category, seconds)."""
    out = Path(out)
    names = list(CATEGORIES if categories is None else categories)
    _check_args(seed, size, names, n_train, n_test)
    _prepare(out, overwrite)
    started = time.perf_counter()
    tick = _Ticker(len(names) * (n_train + n_test), progress)
    summary: dict[str, dict] = {}
    for name in names:
        category = CATEGORY_MAP[name]
        train = _write_split(out, category, "train", [NORMAL] * n_train, size, seed, tick)
        test = _write_split(out, category, "test", defect_plan(category, n_test), size, seed, tick)
        summary[name] = {"kind": category.kind, "train": train.get(NORMAL, 0), "test": test}
    params = {"generator": "dcad data synth", "format": 1, "seed": seed, "size": size,
              "categories": names, "n_train": n_train, "n_test": n_test}
    (out / MARKER).write_text(json.dumps(params, indent=2, sort_keys=True) + "\n")
    return {"root": str(out), "seed": seed, "size": size, "categories": summary, "images": tick.total,
            "seconds": round(time.perf_counter() - started, 3)}
