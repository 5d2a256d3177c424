"""Reading the four on-disk dataset layouts into a `DatasetIndex`.

Layouts (``<cat>`` is a category folder under the root; a root that is itself one category folder,
i.e. holds ``train/``, works too and is named after the folder):

- **mvtec** (MVTec AD): ``<cat>/train/good/*``, ``<cat>/test/good/*``, ``<cat>/test/<defect>/*``,
  masks ``<cat>/ground_truth/<defect>/<stem>_mask.<ext>``.
- **visa** (VisA, raw): ``<cat>/Data/Images/{Normal,Anomaly}/*``, ``<cat>/Data/Masks/Anomaly/*``; the
  split comes from ``split_csv/1cls.csv`` with the columns ``object,split,label,image,mask`` (paths
  relative to the root, label ``normal`` or ``anomaly``). Anomalies get the defect type ``bad``.
- **btad** (BTAD): ``<cat>/train/ok/*``, ``<cat>/test/{ok,ko}/*``, masks ``<cat>/ground_truth/ko/<stem>.<ext>``.
- **folder** (generic): ``<cat>/train/normal/*``, ``<cat>/test/normal/*``, ``<cat>/test/<defect>/*``,
  masks ``<cat>/masks/<defect>/<stem>.<ext>``.

Masks are matched to images by stem, with or without a ``_mask`` suffix and with any image
extension (png, jpg, jpeg, bmp, tif, tiff, in any case). Every anomalous image needs a mask, and
every mask needs an image.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

from dcad.core.data.records import LAYOUTS, NORMAL, DatasetIndex, Record, is_image_file
from dcad.core.errors import DatasetError

VISA_SPLIT = Path("split_csv") / "1cls.csv"
VISA_COLUMNS = ("object", "split", "label", "image", "mask")
EXPECTED = (
    "expected MVTec AD, VisA, BTAD or folder: <cat>/train/good, split_csv/1cls.csv, "
    "<cat>/train/ok or <cat>/train/normal"
)


@dataclass(frozen=True)
class TreeLayout:
    """A layout whose split and labels come from folder names."""

    name: str
    normal: str  # folder name of normal images under train/ and test/
    masks: str  # folder (under the category) that holds one mask folder per defect


TREE_LAYOUTS = {
    "mvtec": TreeLayout("mvtec", "good", "ground_truth"),
    "btad": TreeLayout("btad", "ok", "ground_truth"),
    "folder": TreeLayout("folder", "normal", "masks"),
}


def read_dataset(root: Path, layout: str, categories: list[str] | None) -> DatasetIndex:
    """Index `root` in the given (or detected) layout, keeping only `categories` when given."""
    if layout not in ("auto", *LAYOUTS):
        raise DatasetError(f"unknown layout '{layout}' (choose auto, {', '.join(LAYOUTS)})")
    if not root.is_dir():
        raise DatasetError(f"{root}: no such dataset directory")
    if layout == "auto":
        layout = detect_layout(root)
    wanted = _check_categories(root, layout, categories)
    records = read_visa(root, wanted) if layout == "visa" else read_tree(root, TREE_LAYOUTS[layout], wanted)
    found = sorted({r.category for r in records})
    if not found:
        raise DatasetError(f"{root}: no categories found for layout '{layout}' ({EXPECTED})")
    train = sorted((r for r in records if r.split == "train"), key=_order)
    test = sorted((r for r in records if r.split == "test"), key=_order)
    return DatasetIndex(root=root, layout=layout, categories=found, train=train, test=test)


def _order(record: Record) -> tuple[str, int, str, str]:
    return (record.category, record.label, record.defect_type, record.image_path.as_posix())


# ---- detection -------------------------------------------------------------------------------


def category_dirs(root: Path) -> list[Path]:
    """The category folders of a tree layout: the root itself if it holds train/, else its subfolders."""
    if (root / "train").is_dir():
        return [root]
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def detect_layout(root: Path) -> str:
    """'visa', 'mvtec', 'btad' or 'folder'; DatasetError for none or a mix."""
    if (root / VISA_SPLIT).is_file():
        return "visa"
    seen: dict[str, str] = {}
    for cat in category_dirs(root):
        for name, spec in TREE_LAYOUTS.items():
            if (cat / "train" / spec.normal).is_dir():
                seen.setdefault(name, cat.name)
    if len(seen) > 1:
        found = ", ".join(f"{name} (e.g. {cat})" for name, cat in seen.items())
        raise DatasetError(f"{root}: mixed dataset layouts: {found}")
    if seen:
        return next(iter(seen))
    if any((cat / "Data" / "Images").is_dir() for cat in category_dirs(root)):
        raise DatasetError(f"{root / VISA_SPLIT}: VisA layout without its split file")
    raise DatasetError(f"{root}: unknown dataset layout ({EXPECTED})")


def _available(root: Path, layout: str) -> list[str]:
    if layout == "visa":
        return sorted({row["object"] for _, row in _visa_rows(root)})
    return [c.name for c in category_dirs(root) if (c / "train").is_dir() or (c / "test").is_dir()]


def _check_categories(root: Path, layout: str, categories: list[str] | None) -> set[str] | None:
    if categories is None:
        return None
    available = _available(root, layout)
    unknown = sorted(set(categories) - set(available))
    if unknown:
        raise DatasetError(
            f"{root}: unknown categor{'y' if len(unknown) == 1 else 'ies'} {', '.join(unknown)} "
            f"(available: {', '.join(available) or 'none'})"
        )
    return set(categories)


# ---- tree layouts (mvtec, btad, folder) -------------------------------------------------------


def _subfolders(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def list_images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if is_image_file(p)) if folder.is_dir() else []


def read_tree(root: Path, spec: TreeLayout, wanted: set[str] | None) -> list[Record]:
    records: list[Record] = []
    for cat_dir in category_dirs(root):
        if wanted is not None and cat_dir.name not in wanted:
            continue
        if not (cat_dir / "train").is_dir() and not (cat_dir / "test").is_dir():
            continue  # not a category folder (e.g. a licence or docs folder)
        records += _read_train(cat_dir, spec)
        records += _read_test(cat_dir, spec)
    return records


def _read_train(cat_dir: Path, spec: TreeLayout) -> list[Record]:
    train = cat_dir / "train"
    extras = sorted(p for p in train.iterdir() if p.is_dir() and p.name != spec.normal) if train.is_dir() else []
    if extras:
        raise DatasetError(
            f"{extras[0]}: unexpected folder in the train split (train/ holds only '{spec.normal}' images)"
        )
    normal_dir = train / spec.normal
    images = list_images(normal_dir)
    if not images:
        raise DatasetError(f"{normal_dir}: no images (empty train split)")
    return [Record(p, cat_dir.name, "train", 0, NORMAL, None) for p in images]


def _read_test(cat_dir: Path, spec: TreeLayout) -> list[Record]:
    test = cat_dir / "test"
    defect_dirs = _subfolders(test)
    _check_mask_folders(cat_dir / spec.masks, {d.name for d in defect_dirs}, spec)
    records: list[Record] = []
    for defect_dir in defect_dirs:
        images = list_images(defect_dir)
        if defect_dir.name == spec.normal:
            records += [Record(p, cat_dir.name, "test", 0, NORMAL, None) for p in images]
            continue
        masks = match_masks(images, cat_dir / spec.masks / defect_dir.name)
        records += [Record(p, cat_dir.name, "test", 1, defect_dir.name, masks[p]) for p in images]
    return records


def _check_mask_folders(masks_root: Path, defects: set[str], spec: TreeLayout) -> None:
    """A mask folder whose defect has no test folder holds masks without images."""
    if not masks_root.is_dir():
        return
    for folder in _subfolders(masks_root):
        if folder.name not in defects and folder.name != spec.normal and list_images(folder):
            raise DatasetError(f"{folder}: masks without images (no test/{folder.name} folder)")


def _mask_key(stem: str) -> str:
    return stem[: -len("_mask")] if stem.endswith("_mask") else stem


def match_masks(images: list[Path], mask_dir: Path) -> dict[Path, Path]:
    """Pair each image with `<stem>_mask.*` or `<stem>.*` in `mask_dir`; DatasetError for a gap or an orphan."""
    masks = list_images(mask_dir)
    by_stem = {m.stem: m for m in masks}
    pairs: dict[Path, Path] = {}
    for image in images:
        mask = by_stem.get(image.stem + "_mask") or by_stem.get(image.stem)
        if mask is None:
            raise DatasetError(f"{image}: anomalous image without mask (looked for {image.stem}_mask.* in {mask_dir})")
        pairs[image] = mask
    used = set(pairs.values())
    stems = {image.stem for image in images}
    for mask in masks:
        if mask not in used and _mask_key(mask.stem) not in stems:
            where = images[0].parent if images else mask_dir
            raise DatasetError(f"{mask}: mask without image (no {_mask_key(mask.stem)}.* in {where})")
    return pairs


# ---- VisA -------------------------------------------------------------------------------------


def _visa_rows(root: Path) -> list[tuple[int, dict[str, str]]]:
    split_file = root / VISA_SPLIT
    try:
        with split_file.open(newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            missing = [c for c in VISA_COLUMNS if c not in (reader.fieldnames or [])]
            if missing:
                need = ",".join(VISA_COLUMNS)
                raise DatasetError(f"{split_file}: missing column(s) {', '.join(missing)} (need {need})")
            return [(i + 2, {k: (v or "").strip() for k, v in row.items() if k}) for i, row in enumerate(reader)]
    except OSError as err:
        raise DatasetError(f"{split_file}: cannot read ({err.strerror})") from None
    except csv.Error as err:
        raise DatasetError(f"{split_file}: not a valid CSV ({err})") from None


def read_visa(root: Path, wanted: set[str] | None) -> list[Record]:
    split_file = root / VISA_SPLIT
    records = [
        _visa_record(root, split_file, line, row)
        for line, row in _visa_rows(root)
        if wanted is None or row["object"] in wanted
    ]
    for cat in sorted({r.category for r in records}):
        if not any(r.category == cat and r.split == "train" for r in records):
            raise DatasetError(f"{split_file}: category '{cat}' has an empty train split")
    return records


def _visa_record(root: Path, split_file: Path, line: int, row: dict[str, str]) -> Record:
    where = f"{split_file} line {line}"
    split, label_name = row["split"].lower(), row["label"].lower()
    if split not in ("train", "test"):
        raise DatasetError(f"{where}: split must be train or test, got '{row['split']}'")
    if label_name not in ("normal", "anomaly"):
        raise DatasetError(f"{where}: label must be normal or anomaly, got '{row['label']}'")
    image = root / row["image"]
    if not row["image"] or not image.is_file():
        raise DatasetError(f"{image}: image listed in {where} does not exist")
    if label_name == "normal":
        return Record(image, row["object"], split, 0, NORMAL, None)
    if split == "train":
        raise DatasetError(f"{image}: anomalous image in the train split ({where})")
    mask = root / row["mask"] if row["mask"] else None
    if mask is None or not mask.is_file():
        raise DatasetError(f"{image}: anomalous image without mask ({where} names '{row['mask']}')")
    return Record(image, row["object"], split, 1, "bad", mask)
