"""What a dataset is made of: one `Record` per image, gathered in a `DatasetIndex`."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"})
LAYOUTS = ("mvtec", "visa", "btad", "folder")
NORMAL = "good"


def is_image_file(path: Path) -> bool:
    """True for a regular, non-hidden file with an image extension (case-insensitive)."""
    return path.is_file() and not path.name.startswith(".") and path.suffix.lower() in IMAGE_EXTENSIONS


@dataclass(frozen=True)
class Record:
    """One image of a dataset, with its category, split, label and (for anomalies) mask."""

    image_path: Path
    category: str
    split: str  # "train" | "test"
    label: int  # 0 normal, 1 anomalous
    defect_type: str  # "good" for normal images
    mask_path: Path | None  # None for normal images


@dataclass
class DatasetIndex:
    """Every record of a dataset, split into train (normal only) and test."""

    root: Path
    layout: str
    categories: list[str]
    train: list[Record] = field(default_factory=list)
    test: list[Record] = field(default_factory=list)

    @property
    def records(self) -> list[Record]:
        return [*self.train, *self.test]

    def only(self, categories: list[str]) -> "DatasetIndex":
        """The records of `categories` (those this index has), in this index's order."""
        keep = set(categories)
        return DatasetIndex(self.root, self.layout, [c for c in self.categories if c in keep],
                            [r for r in self.train if r.category in keep], [r for r in self.test if r.category in keep])

    def files(self) -> list[Path]:
        """Every image and mask file of the index, sorted and without duplicates."""
        paths = {r.image_path for r in self.records}
        paths |= {r.mask_path for r in self.records if r.mask_path is not None}
        return sorted(paths)

    def digest(self) -> str:
        """sha256 over (path relative to root, file bytes) of every image and mask, in sorted order."""
        root = self.root.resolve()
        entries = sorted((_relative(p, root), p) for p in self.files())
        sha = hashlib.sha256()
        for rel, path in entries:
            sha.update(rel.encode("utf-8") + b"\0")
            sha.update(hashlib.sha256(path.read_bytes()).digest())
        return sha.hexdigest()


def _relative(path: Path, root: Path) -> str:
    resolved = path.resolve()
    try:
        return resolved.relative_to(root).as_posix()
    except ValueError:
        return resolved.as_posix()


def open_dataset(root: str | Path, layout: str = "auto", categories: list[str] | None = None) -> DatasetIndex:
    """Index the dataset at `root` (layout autodetected unless given); raises DatasetError on bad input."""
    from dcad.core.data.layouts import read_dataset

    return read_dataset(Path(root), layout, categories)


def open_for_model(root: str | Path, model_categories: list[str]) -> tuple[DatasetIndex, list[str]]:
    """The dataset at `root` restricted to the categories a model was trained on, and the ones left out.

    A model trained on some categories of a dataset is evaluated on those; DatasetError when the
    dataset holds none of them."""
    from dcad.core.errors import DatasetError

    index = open_dataset(root)
    known = set(model_categories)
    shared = [c for c in index.categories if c in known]
    if not shared:
        raise DatasetError(f"{root}: none of its categories ({', '.join(index.categories)}) is known to the model "
                           f"(it was trained on {', '.join(model_categories)})")
    skipped = [c for c in index.categories if c not in known]
    return (index.only(shared) if skipped else index), skipped
