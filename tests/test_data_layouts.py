"""Dataset layouts (MVTec AD, VisA, BTAD, folder) on tiny generated fixtures, and their error cases."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dcad.core.data import check_dataset, open_dataset
from dcad.core.errors import DatasetError

SIZE = 8


def _image(path: Path, value: int = 120, size: int = SIZE) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size, size, 3), value, np.uint8)).save(path)
    return path


def _mask(path: Path, size: int = SIZE, pixels: int = 4) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    m = np.zeros((size, size), np.uint8)
    m.flat[:pixels] = 255
    Image.fromarray(m).save(path)
    return path


def make_mvtec(root: Path, cats: tuple[str, ...] = ("bottle", "wood")) -> Path:
    for c in cats:
        for i in range(3):
            _image(root / c / "train" / "good" / f"{i:03d}.png", 100 + i)
        _image(root / c / "test" / "good" / "000.png")
        for i in range(2):
            _image(root / c / "test" / "crack" / f"{i:03d}.png", 30)
            _mask(root / c / "ground_truth" / "crack" / f"{i:03d}_mask.png")
    (root / "license.txt").write_text("not a category")
    return root


def make_btad(root: Path) -> Path:
    for c in ("01", "02"):
        for i in range(2):
            _image(root / c / "train" / "ok" / f"{i:04d}.bmp")
        _image(root / c / "test" / "ok" / "0000.bmp")
        _image(root / c / "test" / "ko" / "0000.bmp", 20)
        _mask(root / c / "ground_truth" / "ko" / "0000.png")  # different extension, same stem
    return root


def make_folder(root: Path) -> Path:
    for i in range(2):
        _image(root / "widget" / "train" / "normal" / f"n{i}.JPG")
    _image(root / "widget" / "test" / "normal" / "t0.png")
    _image(root / "widget" / "test" / "dent" / "d0.tiff", 10)
    _mask(root / "widget" / "masks" / "dent" / "d0.png")
    return root


def make_visa(root: Path) -> Path:
    rows = ["object,split,label,image,mask"]
    for c in ("candle", "pcb1"):
        for i in range(3):
            img = f"{c}/Data/Images/Normal/{i:04d}.JPG"
            _image(root / img)
            rows.append(f"{c},{'train' if i < 2 else 'test'},normal,{img},")
        img, mask = f"{c}/Data/Images/Anomaly/000.JPG", f"{c}/Data/Masks/Anomaly/000.png"
        _image(root / img, 10)
        _mask(root / mask)
        rows.append(f"{c},test,anomaly,{img},{mask}")
    (root / "split_csv").mkdir(parents=True)
    (root / "split_csv" / "1cls.csv").write_text("\n".join(rows) + "\n")
    return root


def test_mvtec_layout(tmp_path: Path) -> None:
    index = open_dataset(make_mvtec(tmp_path))
    assert index.layout == "mvtec" and index.categories == ["bottle", "wood"]
    assert len(index.train) == 6 and all(r.label == 0 and r.split == "train" for r in index.train)
    anomalies = [r for r in index.test if r.label == 1]
    assert len(anomalies) == 4 and {r.defect_type for r in anomalies} == {"crack"}
    for r in anomalies:
        assert r.mask_path is not None and r.mask_path.name == f"{r.image_path.stem}_mask.png"
        assert r.mask_path.parent.name == "crack" and r.category == r.image_path.parents[2].name
    assert all(r.mask_path is None and r.defect_type == "good" for r in index.test if r.label == 0)


def test_single_category_root(tmp_path: Path) -> None:
    make_mvtec(tmp_path)
    index = open_dataset(tmp_path / "wood")
    assert index.categories == ["wood"] and len(index.train) == 3 and len(index.test) == 3


def test_btad_layout(tmp_path: Path) -> None:
    index = open_dataset(make_btad(tmp_path))
    assert index.layout == "btad" and index.categories == ["01", "02"]
    ko = [r for r in index.test if r.label == 1]
    assert len(ko) == 2 and all(r.defect_type == "ko" and r.mask_path.suffix == ".png" for r in ko)


def test_folder_layout_with_mixed_case_extensions(tmp_path: Path) -> None:
    index = open_dataset(make_folder(tmp_path))
    assert index.layout == "folder" and index.categories == ["widget"]
    assert [r.image_path.name for r in index.train] == ["n0.JPG", "n1.JPG"]
    (dent,) = [r for r in index.test if r.label == 1]
    assert dent.defect_type == "dent" and dent.mask_path.name == "d0.png"


def test_visa_layout(tmp_path: Path) -> None:
    index = open_dataset(make_visa(tmp_path))
    assert index.layout == "visa" and index.categories == ["candle", "pcb1"]
    assert len(index.train) == 4 and len(index.test) == 4
    bad = [r for r in index.test if r.label == 1]
    assert len(bad) == 2 and all(r.defect_type == "bad" and r.mask_path.is_file() for r in bad)


def test_category_filter_and_unknown_category(tmp_path: Path) -> None:
    make_mvtec(tmp_path)
    assert open_dataset(tmp_path, categories=["wood"]).categories == ["wood"]
    with pytest.raises(DatasetError, match=r"unknown category carpet \(available: bottle, wood\)"):
        open_dataset(tmp_path, categories=["carpet"])


def test_explicit_layout_must_match(tmp_path: Path) -> None:
    make_mvtec(tmp_path)
    assert open_dataset(tmp_path, layout="mvtec").layout == "mvtec"
    with pytest.raises(DatasetError, match=r"train/good: unexpected folder in the train split"):
        open_dataset(tmp_path, layout="btad")
    with pytest.raises(DatasetError, match="unknown layout 'coco'"):
        open_dataset(tmp_path, layout="coco")


def test_unknown_layout(tmp_path: Path) -> None:
    _image(tmp_path / "pics" / "a.png")
    with pytest.raises(DatasetError, match=r"unknown dataset layout \(expected MVTec AD, VisA, BTAD or folder"):
        open_dataset(tmp_path)


def test_missing_root(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=r"absent: no such dataset directory"):
        open_dataset(tmp_path / "absent")


def test_empty_train_split_names_the_folder(tmp_path: Path) -> None:
    make_mvtec(tmp_path)
    for p in (tmp_path / "wood" / "train" / "good").iterdir():
        p.unlink()
    with pytest.raises(DatasetError, match=r"wood/train/good: no images \(empty train split\)"):
        open_dataset(tmp_path)


def test_anomalous_image_without_mask_names_the_image(tmp_path: Path) -> None:
    make_mvtec(tmp_path)
    (tmp_path / "bottle" / "ground_truth" / "crack" / "001_mask.png").unlink()
    with pytest.raises(DatasetError, match=r"bottle/test/crack/001\.png: anomalous image without mask"):
        open_dataset(tmp_path)


def test_mask_without_image_names_the_mask(tmp_path: Path) -> None:
    make_mvtec(tmp_path)
    _mask(tmp_path / "bottle" / "ground_truth" / "crack" / "007_mask.png")
    with pytest.raises(DatasetError, match=r"crack/007_mask\.png: mask without image"):
        open_dataset(tmp_path)


def test_visa_missing_mask_names_the_image(tmp_path: Path) -> None:
    make_visa(tmp_path)
    (tmp_path / "pcb1" / "Data" / "Masks" / "Anomaly" / "000.png").unlink()
    with pytest.raises(DatasetError, match=r"pcb1/Data/Images/Anomaly/000\.JPG: anomalous image without mask"):
        open_dataset(tmp_path)


def test_visa_bad_csv_column(tmp_path: Path) -> None:
    make_visa(tmp_path)
    (tmp_path / "split_csv" / "1cls.csv").write_text("object,split,image\ncandle,train,x.png\n")
    with pytest.raises(DatasetError, match=r"1cls\.csv: missing column\(s\) label, mask"):
        open_dataset(tmp_path)


def test_mixed_layouts_are_rejected(tmp_path: Path) -> None:
    make_mvtec(tmp_path, cats=("bottle",))
    _image(tmp_path / "02" / "train" / "ok" / "0.png")
    with pytest.raises(DatasetError, match="mixed dataset layouts"):
        open_dataset(tmp_path)


def test_digest_is_stable_and_sees_content_changes(tmp_path: Path) -> None:
    make_mvtec(tmp_path)
    first = open_dataset(tmp_path).digest()
    assert first == open_dataset(tmp_path).digest() and len(first) == 64
    _image(tmp_path / "wood" / "test" / "good" / "000.png", value=121)
    assert open_dataset(tmp_path).digest() != first


def test_check_reports_counts_and_mask_coverage(tmp_path: Path) -> None:
    summary = check_dataset(make_mvtec(tmp_path))
    wood = summary["categories"]["wood"]
    assert wood["train"] == 3 and wood["test"] == {"good": 1, "crack": 2}
    assert wood["mask_coverage"] == pytest.approx(4 / SIZE**2)
    assert summary["totals"] == {"categories": 2, "train": 6, "test": 6, "test_good": 2,
                                 "test_anomalous": 4, "masks": 4, "images": 12}


def test_check_decodes_every_file(tmp_path: Path) -> None:
    make_mvtec(tmp_path)
    broken = tmp_path / "wood" / "train" / "good" / "002.png"
    broken.write_bytes(broken.read_bytes()[:40])
    with pytest.raises(DatasetError, match=r"wood/train/good/002\.png: unreadable"):
        check_dataset(tmp_path)


def test_check_rejects_mask_size_mismatch_naming_both_files(tmp_path: Path) -> None:
    make_mvtec(tmp_path)
    _mask(tmp_path / "wood" / "ground_truth" / "crack" / "000_mask.png", size=SIZE + 2)
    message = r"crack/000_mask\.png: mask size 10x10 does not match image .*crack/000\.png \(8x8\)"
    with pytest.raises(DatasetError, match=message):
        check_dataset(tmp_path)


def test_check_converts_grey_rgba_and_16bit_images(tmp_path: Path) -> None:
    make_mvtec(tmp_path, cats=("bottle",))
    good = tmp_path / "bottle" / "train" / "good"
    Image.fromarray(np.full((SIZE, SIZE), 90, np.uint8)).save(good / "000.png")  # L
    Image.fromarray(np.full((SIZE, SIZE, 4), 90, np.uint8), "RGBA").save(good / "001.png")
    Image.fromarray(np.full((SIZE, SIZE), 40000, np.uint16)).save(good / "002.png")  # I;16
    summary = check_dataset(tmp_path)
    assert summary["categories"]["bottle"]["train"] == 3 and summary["categories"]["bottle"]["sizes"] == ["8x8"]
