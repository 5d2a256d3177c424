"""`dcad eval --set`: inference-only overrides of a trained model (ablations without retraining)."""

import warnings

import pytest
import torch

from dcad.core.config import ConfigError, load_config
from dcad.core.model.drdc import DRDC, with_inference_overrides


@pytest.fixture(scope="module")
def model():
    cfg = load_config("tiny", overrides=["backbone.weights=none"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        net = DRDC(cfg, ["a", "b"]).eval()
    net.calibration.refine.fitted.fill_(True)
    return net


def test_base_only_skips_the_refiner_and_returns_the_blurred_base_map(model):
    images = torch.rand(2, 3, model.image_size, model.image_size)
    cats = torch.tensor([0, 1])
    full = model(images, cats)
    assert full.refine_maps is not None
    with_inference_overrides(model, ["ablation.mode=base_only"])
    try:
        base = model(images, cats)
        assert base.refine_maps is None
        torch.testing.assert_close(base.base_map, full.base_map)
        assert not torch.allclose(base.anomaly_map, full.anomaly_map)
    finally:
        with_inference_overrides(model, ["ablation.mode=full"])
    assert model.uses_refiner and model.cfg.ablation.mode == "full"


def test_fusion_and_guidance_keys_change_the_config(model):
    with_inference_overrides(model, ["fusion.mode=sum", "refiner.guidance_scale=2.0", "fusion.pool_kernel=4"])
    assert (model.cfg.fusion.mode, model.cfg.refiner.guidance_scale, model.cfg.fusion.pool_kernel) == ("sum", 2.0, 4)
    assert model.refiner().use_guidance


@pytest.mark.parametrize("item, words", [
    ("refiner.timesteps=[5]", "changes the trained model"),
    ("base.hidden_dim=8", "changes the trained model"),
    ("fusion.mode=median", "fusion.mode"),
])
def test_training_keys_and_bad_values_are_named(model, item, words):
    with pytest.raises(ConfigError, match=words.replace(".", r"\.")):
        with_inference_overrides(model, [item])


def test_refine_only_needs_a_refiner():
    cfg = load_config("tiny", overrides=["backbone.weights=none", "ablation.mode=base_only"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        net = DRDC(cfg, ["a"])
    with pytest.raises(ConfigError, match="without a refiner"):
        with_inference_overrides(net, ["ablation.mode=refine_only"])


def test_score_maps_re_scores_one_pass_as_any_ablation(model):
    """The refinement-only map re-scored from a full pass equals a refinement-only pass (no second denoising)."""
    images = torch.rand(2, 3, model.image_size, model.image_size)
    cats = torch.tensor([1, 0])
    full = model(images, cats)
    base_z = model.calibration.standardise_base(full.base_map)
    again, scores = model.score_maps(base_z, full.refine_maps, full.category_index)
    torch.testing.assert_close(again, full.anomaly_map)
    torch.testing.assert_close(scores, full.image_score)
    with_inference_overrides(model, ["ablation.mode=refine_only"])
    try:
        refine = model(images, cats)
    finally:
        with_inference_overrides(model, ["ablation.mode=full"])
    rescored, rescored_scores = model.score_maps(base_z, full.refine_maps, full.category_index, "refine_only")
    torch.testing.assert_close(rescored, refine.anomaly_map)
    torch.testing.assert_close(rescored_scores, refine.image_score)
    assert not torch.allclose(rescored, full.anomaly_map)


def test_image_map_base_scores_images_by_the_base_map_and_keeps_the_refined_map(model):
    """`fusion.image_map=base`: the full model's image scores are the base branch's; its map is still the fused one;
    the refinement-only ablation still scores its own map."""
    images = torch.rand(3, 3, model.image_size, model.image_size)
    cats = torch.tensor([0, 1, 0])
    full = model(images, cats)
    base_z = model.calibration.standardise_base(full.base_map)
    _, base_scores = model.score_maps(base_z, full.refine_maps, full.category_index, "base_only")
    assert not torch.allclose(full.image_score, base_scores)
    with_inference_overrides(model, ["fusion.image_map=base"])
    try:
        scored_by_base = model(images, cats)
        _, refine_only_scores = model.score_maps(base_z, full.refine_maps, full.category_index, "refine_only")
    finally:
        with_inference_overrides(model, ["fusion.image_map=final"])
    torch.testing.assert_close(scored_by_base.image_score, base_scores)
    torch.testing.assert_close(scored_by_base.anomaly_map, full.anomaly_map)
    _, refine_only_final = model.score_maps(base_z, full.refine_maps, full.category_index, "refine_only")
    torch.testing.assert_close(refine_only_scores, refine_only_final)
