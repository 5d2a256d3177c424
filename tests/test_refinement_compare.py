"""The refinement comparison in feature space (`refiner.compare=features`)."""

import warnings

import pytest
import torch

from dcad.core.config import load_config
from dcad.core.model.drdc import DRDC


@pytest.fixture(scope="module")
def model():
    torch.set_num_threads(1)
    cfg = load_config("tiny", overrides=["refiner.compare=features", "refiner.compare_stages=2"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return DRDC(cfg, ["a", "b"]).eval()


def test_feature_comparison_is_zero_for_a_perfect_inpainting_and_peaks_at_a_change(model):
    size = model.image_size
    gen = torch.Generator().manual_seed(0)
    images = torch.rand(2, 3, size, size, generator=gen) * 0.2 + 0.4
    t, s = len(model.cfg.refiner.timesteps), len(model.cfg.refiner.patch_sizes)
    perfect = images[:, None, None].expand(2, t, s, 3, size, size).clone()
    refiner = model.refiner()
    maps = model.compare(images, perfect, refiner)
    assert maps.shape == (2, t, s, size, size)
    assert maps.abs().max().item() < 1e-4
    changed = perfect.clone()
    changed[1, :, :, :, 8:20, 40:52] = 1.0 - changed[1, :, :, :, 8:20, 40:52]  # a bright square in image 1 only
    maps = model.compare(images, changed, refiner)
    assert maps[0].abs().max().item() < 1e-4
    inside = maps[1, :, :, 8:20, 40:52].mean().item()
    outside = maps[1, :, :, 40:, :20].mean().item()
    assert inside > 5 * outside and inside > 0.05


def test_more_stages_than_the_backbone_has_are_refused(model):
    from dcad.core.errors import ModelError

    size = model.image_size
    images = torch.rand(1, 3, size, size)
    inpainted = images[:, None, None].expand(1, 1, 1, 3, size, size)
    model.cfg = model.cfg.model_copy(update={"refiner": model.cfg.refiner.model_copy(update={"compare_stages": 9})})
    try:
        with pytest.raises(ModelError, match="compare_stages=9"):
            model.compare(images, inpainted, model.refiner())
    finally:
        model.cfg = model.cfg.model_copy(update={"refiner": model.cfg.refiner.model_copy(update={"compare_stages": 2})})


def test_the_comparison_is_a_rescore_key_no_sweep_retrains_for():
    from dcad.train.shared_stages import stage_of

    assert stage_of("refiner.compare") == stage_of("refiner.compare_stages") == "rescore"
    assert stage_of("refiner.hf_sigma") == "refiner"
