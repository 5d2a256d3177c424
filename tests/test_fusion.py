"""Standardisation of refinement maps, fusion with the base map, image score and blur."""

import pytest
import torch
import torch.nn.functional as F

from dcad.core.config import ConfigError, FusionConfig
from dcad.core.errors import ModelError
from dcad.core.model.fusion import RefinementStats, fuse, fusion_weights, gaussian_blur, image_score

T, S = [100, 250], [8, 16]


def normal_maps(n, size=32, seed=0, offset=0.0):
    """Maps with a fixed per-position pattern (left half hot) plus noise: what per-pixel stats should remove."""
    g = torch.Generator().manual_seed(seed)
    pattern = torch.zeros(size, size)
    pattern[:, : size // 2] = 3.0
    return offset + pattern + 0.5 * torch.randn(n, 2, 2, size, size, generator=g)


# ---- statistics --------------------------------------------------------------------------------------


def test_pixel_stats_standardise_normal_maps_and_remove_fixed_patterns():
    stats = RefinementStats(2, 2, mode="pixel", map_size=32, smooth_sigma=1.0, stride=1)
    stats.fit(normal_maps(8, seed=s) for s in range(4))
    z = stats.standardise(normal_maps(16, seed=99))
    inner = z[..., 4:-4, 4:-4]  # away from the pattern's edge, which smoothing blurs
    assert abs(inner[..., :8].mean()) < 0.2 and abs(inner[..., -8:].mean()) < 0.2
    assert 0.7 < inner[..., -8:].std() < 1.3
    scalar = RefinementStats(2, 2, mode="scalar").fit([normal_maps(32)])
    zs = scalar.standardise(normal_maps(16, seed=99))
    assert zs[..., :, :12].mean() - zs[..., :, -12:].mean() > 1.5  # one scalar keeps the pattern


def test_stats_are_kept_per_category_with_a_pooled_fallback():
    a, b = normal_maps(8, offset=0.0), normal_maps(8, seed=1, offset=10.0)
    cats = torch.tensor([0] * 8 + [1] * 8)
    stats = RefinementStats(2, 2, 2, mode="scalar").fit([(torch.cat([a, b]), cats)])
    assert abs(stats.standardise(b, torch.ones(8, dtype=torch.long)).mean()) < 0.1
    assert abs(stats.standardise(a, torch.zeros(8, dtype=torch.long)).mean()) < 0.1
    pooled = stats.standardise(b)  # unknown category: pooled statistics
    assert 0.5 < pooled.mean() < 1.5
    assert torch.equal(stats.standardise(b, torch.full((8,), 7)), pooled)


def test_category_without_validation_images_uses_the_pooled_row():
    maps = torch.cat([normal_maps(4), normal_maps(4, offset=5.0)])
    stats = RefinementStats(2, 2, 3, mode="scalar").fit([(maps, torch.tensor([0] * 4 + [2] * 4))])
    assert torch.equal(stats.mean[1], stats.mean[-1])


def test_stats_survive_a_state_dict_round_trip_into_a_fresh_module():
    stats = RefinementStats(2, 2).fit([normal_maps(6, size=16)])
    fresh = RefinementStats(2, 2)
    buffers = {name: id(b) for name, b in fresh.named_buffers()}
    fresh.load_state_dict(stats.state_dict(), strict=True)
    assert buffers == {name: id(b) for name, b in fresh.named_buffers()}, "buffers are sized at construction"
    maps = normal_maps(3, size=16, seed=5)
    assert fresh.is_fitted
    assert torch.equal(fresh.standardise(maps), stats.standardise(maps))


def test_unfitted_or_misshapen_use_is_a_clear_error():
    stats = RefinementStats(2, 2)
    with pytest.raises(ModelError, match="not fitted"):
        stats.standardise(normal_maps(1))
    with pytest.raises(ModelError, match="timesteps × scales"):
        stats.fit([torch.zeros(2, 3, 2, 8, 8)])
    with pytest.raises(ModelError, match="no normal validation images"):
        stats.fit([])
    with pytest.raises(ModelError, match="category index 1 but 1 categories"):
        stats.fit([(normal_maps(2), torch.tensor([0, 1]))])
    pixel = RefinementStats(2, 2, mode="pixel", map_size=16)
    with pytest.raises(ModelError, match="do not fit buffers sized"):
        pixel.fit([normal_maps(2, size=32)])


# ---- fusion ------------------------------------------------------------------------------------------


def test_uniform_weights_average_the_maps_and_keys_select_them():
    g = torch.Generator().manual_seed(0)
    base, refine = torch.zeros(2, 1, 16, 16), torch.randn(2, 2, 2, 16, 16, generator=g)
    cfg = FusionConfig(mode="sum", base_weight=0.0, blur_sigma=0.0)
    assert torch.allclose(fuse(base, refine, cfg, T, S), refine.mean(dim=(1, 2)).unsqueeze(1), atol=1e-6)
    one = FusionConfig(mode="sum", base_weight=0.0, blur_sigma=0.0, weights={"t250_s8": 2.0})
    assert torch.allclose(fuse(base, refine, one, T, S), refine[:, 1:2, 0], atol=1e-6)


def test_bad_weights_are_named():
    with pytest.raises(ConfigError, match="t999_s8"):
        fusion_weights({"t999_s8": 1.0}, T, S)
    with pytest.raises(ConfigError, match="positive sum"):
        fusion_weights({"t100_s8": 0.0}, T, S)


def test_gated_fusion_uses_refinement_only_where_the_base_suspects_a_defect():
    cfg = FusionConfig(mode="gated", base_weight=0.5, blur_sigma=0.0, gate_offset=1.0, gate_temperature=0.25)
    base = torch.full((1, 1, 8, 8), -1.0)
    base[..., :, 4:] = 4.0  # right half: the base suspects a defect
    refine = torch.zeros(1, 2, 2, 8, 8)
    refine[..., 2, :] = 6.0  # a sharp line across both halves
    out = fuse(base, refine, cfg, T, S)
    assert torch.allclose(out[..., 2, :4], out[..., 5, :4], atol=1e-2)  # ignored where the base is normal
    assert out[..., 2, 4:].min() > out[..., 5, 4:].max() + 2.5  # sharpens where the base is suspicious
    summed = fuse(base, refine, FusionConfig(mode="sum", blur_sigma=0.0), T, S)
    assert summed[..., 2, :4].min() > summed[..., 5, :4].max() + 2.5  # a plain sum lights up normal areas


def test_product_is_high_only_where_both_agree():
    cfg = FusionConfig(mode="product", blur_sigma=0.0)
    base = torch.tensor([[-3.0, 3.0, -3.0, 3.0]]).reshape(1, 1, 1, 4).expand(1, 1, 4, 4)
    refine = torch.tensor([[-3.0, -3.0, 3.0, 3.0]]).reshape(1, 1, 1, 1, 4).expand(1, 2, 2, 4, 4)
    row = fuse(base, refine, cfg, T, S)[0, 0, 0]
    assert row[3] > 5 * row[1] and row[3] > 5 * row[2] and row[3] > 20 * row[0]


def test_ablation_switches_and_blur():
    g = torch.Generator().manual_seed(0)
    base, refine = torch.randn(1, 1, 16, 16, generator=g), torch.randn(1, 2, 2, 16, 16, generator=g)
    cfg = FusionConfig(blur_sigma=0.0)
    assert torch.equal(fuse(base, refine, cfg, T, S, base_only=True), base)
    assert torch.allclose(fuse(base, refine, cfg, T, S, refine_only=True), refine.mean(dim=(1, 2)).unsqueeze(1), atol=1e-6)
    blurred = fuse(base, refine, FusionConfig(blur_sigma=2.0), T, S, base_only=True)
    assert blurred.std() < base.std() / 2


def test_fuse_checks_map_layout():
    with pytest.raises(ModelError, match=r"\[B,2,2,H,W\]"):
        fuse(torch.zeros(1, 1, 8, 8), torch.zeros(1, 2, 1, 8, 8), FusionConfig(), T, S)


# ---- score and blur ----------------------------------------------------------------------------------


def test_image_score_is_the_max_of_the_average_pooled_map():
    g = torch.Generator().manual_seed(0)
    maps = torch.rand(3, 1, 20, 20, generator=g)
    expected = F.avg_pool2d(maps, 4, stride=1).flatten(1).max(dim=1).values
    assert torch.allclose(image_score(maps, 4), expected)
    spike = torch.zeros(1, 1, 16, 16)
    spike[..., 7, 7] = 16.0
    assert torch.allclose(image_score(spike, 4), torch.tensor([1.0]))  # one hot pixel is diluted by the kernel
    assert torch.allclose(image_score(spike, 64), torch.tensor([16.0 / 256]))  # kernel clipped to the map


def test_gaussian_blur_keeps_constants_and_mass():
    assert torch.allclose(gaussian_blur(torch.full((2, 3, 16, 16), 0.3), 2.0), torch.full((2, 3, 16, 16), 0.3))
    spike = torch.zeros(1, 1, 33, 33)
    spike[..., 16, 16] = 1.0
    out = gaussian_blur(spike, 2.0)
    assert abs(out.sum().item() - 1.0) < 1e-3 and out.max() < 0.05
    assert torch.equal(gaussian_blur(spike, 0.0), spike)
    assert gaussian_blur(torch.rand(2, 2, 3, 4, 4), 5.0).shape == (2, 2, 3, 4, 4)  # tiny maps, any leading dims
