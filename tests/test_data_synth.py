"""The synthetic benchmark generator and the defect library it shares with the validation split."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from dcad.core.data import CATEGORIES, DEFECTS, SUBTLE, check_dataset, load_image, load_mask, open_dataset, synthesize
from dcad.core.data.defects import CHANGED, MIN_AREA
from dcad.core.data.scenes import CATEGORY_MAP
from dcad.core.data.synth import MARKER
from dcad.core.errors import DatasetError

SMALL = {"size": 64, "n_train": 2, "n_test": 9}


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("synth") / "a"
    synthesize(root, seed=0, **SMALL)
    return root


def test_same_arguments_give_identical_bytes(small: Path, tmp_path: Path) -> None:
    synthesize(tmp_path / "b", seed=0, **SMALL)
    assert _files(small) == _files(tmp_path / "b")


def test_different_seed_changes_every_image(small: Path, tmp_path: Path) -> None:
    synthesize(tmp_path / "c", seed=1, **SMALL)
    a, c = _files(small), _files(tmp_path / "c")
    assert a.keys() == c.keys()
    images = [k for k in a if k.endswith(".png") and "ground_truth" not in k]
    assert images and all(a[k] != c[k] for k in images)


def test_category_output_does_not_depend_on_the_others(small: Path, tmp_path: Path) -> None:
    synthesize(tmp_path / "d", seed=0, categories=["gear"], **SMALL)
    only = _files(tmp_path / "d")
    full = _files(small)
    gear = {k: v for k, v in only.items() if k.startswith("gear/")}
    assert gear and all(full[k] == v for k, v in gear.items())


def test_writes_an_mvtec_dataset_with_textures_objects_and_defects(small: Path) -> None:
    index = open_dataset(small)
    assert index.layout == "mvtec" and index.categories == sorted(CATEGORIES)
    kinds = [CATEGORY_MAP[c].kind for c in CATEGORIES]
    assert kinds.count("texture") >= 3 and kinds.count("object") >= 3
    for cat in index.categories:
        test = [r for r in index.test if r.category == cat]
        assert sum(r.label == 0 for r in test) == 3  # a third of 9
        assert len([r for r in index.train if r.category == cat]) == 2
    defect_types = {r.defect_type for r in index.test if r.label == 1}
    assert len(defect_types) >= 5 and defect_types <= set(DEFECTS) and defect_types & SUBTLE
    summary = check_dataset(small)  # decodes every image and mask, checks their sizes
    assert all(entry["empty_masks"] == 0 and entry["sizes"] == ["64x64"] for entry in summary["categories"].values())


def test_masks_are_large_enough(small: Path) -> None:
    for record in open_dataset(small).test:
        if record.label:
            mask = load_mask(record.mask_path, shape=load_image(record.image_path).shape[:2])
            assert mask.mean() >= MIN_AREA, record.mask_path


def test_refuses_a_non_empty_directory(small: Path, tmp_path: Path) -> None:
    (tmp_path / "keep.txt").write_text("precious")
    with pytest.raises(DatasetError, match="directory is not empty"):
        synthesize(tmp_path, **SMALL)
    with pytest.raises(DatasetError, match=f"not written by `dcad data synth` \\(no {MARKER}\\)"):
        synthesize(tmp_path, overwrite=True, **SMALL)
    assert (tmp_path / "keep.txt").read_text() == "precious"


def test_overwrite_replaces_a_previous_synthetic_dataset(tmp_path: Path) -> None:
    synthesize(tmp_path / "o", categories=["brick", "gear"], **SMALL)
    synthesize(tmp_path / "o", categories=["gear"], overwrite=True, **SMALL)
    assert open_dataset(tmp_path / "o").categories == ["gear"]


@pytest.mark.parametrize("kwargs, message", [
    ({"categories": ["nope"]}, "unknown synthetic category nope"),
    ({"size": 8}, "size must be in"),
    ({"n_train": 1}, "at least 2 train images"),
])
def test_bad_arguments(tmp_path: Path, kwargs: dict, message: str) -> None:
    with pytest.raises(DatasetError, match=message):
        synthesize(tmp_path / "x", **{**SMALL, **kwargs})


# ---- the defect library ---------------------------------------------------------------------


def _renders() -> list[tuple[str, np.ndarray]]:
    out = []
    for name in ("gravel", "brick", "capsule", "hex_nut"):
        rng = np.random.default_rng(7)
        out.append((name, CATEGORY_MAP[name].render(rng, 96)))
    return out


RENDERS = _renders()


@pytest.mark.parametrize("defect", sorted(DEFECTS))
def test_defect_masks_cover_exactly_the_changed_pixels(defect: str) -> None:
    for cat, image in RENDERS:
        for seed in range(3):
            out, mask = DEFECTS[defect](image.copy(), np.random.default_rng(seed))
            assert out.shape == image.shape and out.dtype == np.float32 and mask.dtype == np.bool_
            change = np.abs(out - image).max(axis=2)
            near = ndimage.binary_dilation(mask, iterations=2)
            assert not ((change > CHANGED) & ~near).any(), f"{defect} on {cat}: change outside the mask"
            assert mask.mean() >= MIN_AREA, f"{defect} on {cat}: mask too small"
            assert (change[mask] > CHANGED).all()
            mean_change = float(change[mask].mean())
            if defect in SUBTLE:
                assert 0.03 <= mean_change <= 0.1, f"{defect} on {cat}: contrast {mean_change:.3f}"
            else:
                assert mean_change >= 0.08, f"{defect} on {cat}: contrast {mean_change:.3f}"


def test_defects_are_deterministic_and_work_on_any_shape() -> None:
    image = np.random.default_rng(1).random((40, 56, 3), dtype=np.float32)
    for name, defect in DEFECTS.items():
        a_img, a_mask = defect(image, np.random.default_rng(3))
        b_img, b_mask = defect(image, np.random.default_rng(3))
        np.testing.assert_array_equal(a_img, b_img)
        np.testing.assert_array_equal(a_mask, b_mask)
        assert a_mask.shape == (40, 56) and a_mask.any(), name


@pytest.mark.parametrize("value", [0.0, 0.5, 1.0])
def test_defects_never_return_an_empty_mask_even_on_flat_tiny_images(value: float) -> None:
    flat = np.full((16, 16, 3), value, np.float32)
    for name, defect in DEFECTS.items():
        out, mask = defect(flat, np.random.default_rng(0))
        assert mask.any(), name
        assert (np.abs(out - flat).max(axis=2)[mask] > CHANGED).all(), name


def test_objects_keep_defects_on_the_object() -> None:
    """On a plain background, defects land on the object: masked pixels were foreground."""
    _, image = RENDERS[2]  # capsule
    background = np.abs(image - image[0, 0]).max(axis=2) < 0.1
    for name in ("scratch", "stain", "faint_stain", "missing_part"):
        _, mask = DEFECTS[name](image, np.random.default_rng(5))
        assert (mask & background).mean() <= 0.1 * mask.mean(), name


def test_missing_part_fills_with_background() -> None:
    _, image = RENDERS[3]  # hex nut on a dark background
    out, mask = DEFECTS["missing_part"](image, np.random.default_rng(2))
    corner = image[:4, :4].reshape(-1, 3).mean(axis=0)
    assert np.abs(image[mask] - corner).max(axis=1).mean() > 0.2  # it was metal
    assert np.abs(out[mask] - corner).max(axis=1).mean() < 0.06  # now it is background
