"""Base branch: neighbour mask, jitter, shapes, anomaly map, feature cache and a small overfit."""

from __future__ import annotations

import pytest
import torch

from dcad.core.config import BackboneConfig, BaseBranchConfig, StageTrainConfig
from dcad.core.errors import ModelError
from dcad.core.model.backbone import FeatureExtractor
from dcad.core.model.base_branch import BaseReconstructor, feature_jitter, neighbor_mask, token_error, upsample_map
from dcad.train.base_stage import BaseStage
from dcad.train.features import FeatureCache, compute_features
from dcad.train.loop import fit_stage


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def small_cfg(**kw) -> BaseBranchConfig:
    base = dict(hidden_dim=32, num_encoder_layers=1, num_decoder_layers=2, num_heads=4, ffn_dim=64,
                neighbor_size=3, dropout=0.0)
    return BaseBranchConfig(**{**base, **kw})


@pytest.mark.parametrize(("grid", "k"), [((5, 6), 3), ((7, 7), 5), ((4, 9), 1)])
def test_neighbor_mask_is_exactly_the_kxk_window(grid, k):
    mask = neighbor_mask(grid, k)
    h, w = grid
    expected = torch.zeros(h * w, h * w, dtype=torch.bool)
    for qi in range(h):
        for qj in range(w):
            for ki in range(h):
                for kj in range(w):
                    if abs(qi - ki) <= k // 2 and abs(qj - kj) <= k // 2:
                        expected[qi * w + qj, ki * w + kj] = True
    assert torch.equal(mask, expected)
    centre = (h // 2) * w + w // 2
    assert int(mask[centre].sum()) == min(k, h) * min(k, w)


def test_neighbor_mask_rejects_even_or_all_covering_sizes():
    assert neighbor_mask((4, 4), 0) is None
    with pytest.raises(ModelError, match="neighbor_size=4 must be odd"):
        neighbor_mask((8, 8), 4)
    with pytest.raises(ModelError, match="masks every token of the 4x4 grid"):
        neighbor_mask((4, 4), 5)


def test_all_three_attentions_use_the_neighbour_mask():
    model = BaseReconstructor(8, (4, 5), small_cfg(num_encoder_layers=2)).eval()
    seen = []

    def record(module, args, kwargs):
        seen.append(kwargs["attn_mask"])

    attentions = [m for m in model.modules() if isinstance(m, torch.nn.MultiheadAttention)]
    assert len(attentions) == 2 + 2 * 2  # encoder self-attention, decoder memory and output attention
    for attention in attentions:
        attention.register_forward_pre_hook(record, with_kwargs=True)
    model(torch.randn(2, 8, 4, 5))
    assert len(seen) == len(attentions)
    assert all(m is not None and torch.equal(m, neighbor_mask((4, 5), 3)) for m in seen)


def test_reconstruction_shape_and_input_check():
    model = BaseReconstructor(12, (3, 6), small_cfg())
    out = model(torch.randn(5, 12, 3, 6))
    assert out.shape == (5, 12, 3, 6)
    with pytest.raises(ModelError, match=r"expects features \[B,12,3,6\]"):
        model(torch.randn(5, 12, 6, 3))
    with pytest.raises(ModelError, match="divisible"):
        BaseReconstructor(12, (3, 6), small_cfg(hidden_dim=30))


def test_jitter_only_in_training():
    torch.manual_seed(0)
    model = BaseReconstructor(8, (4, 4), small_cfg(jitter_scale=20.0))
    feats = torch.randn(3, 8, 4, 4)
    gen = lambda s: torch.Generator().manual_seed(s)  # noqa: E731
    model.eval()
    clean = model(feats)
    assert torch.equal(clean, model(feats, gen(1))) and torch.equal(clean, model(feats, gen(2)))
    model.train()  # dropout is 0: any difference comes from jitter
    assert not torch.allclose(model(feats, gen(1)), clean)
    assert not torch.allclose(model(feats, gen(1)), model(feats, gen(2)))
    assert torch.equal(model(feats, gen(1)), model(feats, gen(1)))
    model.jitter_scale = 0.0
    assert torch.allclose(model(feats, gen(1)), clean)


def test_feature_jitter_scales_with_token_norm_and_probability():
    channels = 256
    tokens = torch.randn(64, 10, channels) * torch.linspace(0.5, 5, 10).view(1, 10, 1)
    noise = feature_jitter(tokens, 20.0, 1.0, torch.Generator().manual_seed(0)) - tokens
    relative = noise / (tokens.norm(dim=2, keepdim=True) / channels)
    assert relative.std().item() == pytest.approx(20.0, rel=0.03)
    assert relative.mean().abs().item() < 0.5
    assert torch.equal(feature_jitter(tokens, 20.0, 0.0, torch.Generator().manual_seed(0)), tokens)
    half = feature_jitter(tokens, 20.0, 0.5, torch.Generator().manual_seed(0))
    changed = (half != tokens).flatten(1).any(dim=1).float().mean().item()
    assert 0.3 < changed < 0.7


def test_base_anomaly_map_is_token_l2_error_upsampled():
    feats = torch.zeros(2, 4, 4, 4)
    recon = feats.clone()
    recon[1, :, 1, 2] = torch.tensor([3.0, 4.0, 0.0, 0.0])  # error norm 5 at token (1, 2) of image 1
    amap = upsample_map(token_error(feats, recon), image_size=32)
    assert amap.shape == (2, 1, 32, 32)
    assert amap[0].abs().max() == 0
    assert 4.0 < amap[1].max().item() <= 5.0  # bilinear (align_corners=False) peaks between pixel centres
    row, col = divmod(int(amap[1, 0].argmax()), 32)
    assert 8 <= row < 16 and 16 <= col < 24  # inside the 8×8 cell of token (1, 2)
    assert amap[1, 0, 30, 2].item() == 0.0


def test_compute_features_caches_the_extractor_output_with_flips():
    extractor = FeatureExtractor(BackboneConfig(feature_stride=16), image_size=32)
    images = torch.rand(5, 3, 32, 32)
    dataset = [{"image": images[i], "category_index": i % 2, "category": "x"} for i in range(5)]
    cache = compute_features(extractor, dataset, batch_size=2, device="cpu", hflip=True)
    assert len(cache) == 10 and cache.channels == extractor.channels and cache.grid == (2, 2)
    direct, flipped = extractor(images), extractor(images.flip(-1))
    assert torch.allclose(cache.features[0:2], direct[0:2]) and torch.allclose(cache.features[2:4], flipped[0:2])
    assert torch.equal(cache.category_index, torch.tensor([0, 1, 0, 1, 0, 1, 0, 1, 0, 0]))
    prototypes = cache.category_prototypes(3)
    assert torch.allclose(prototypes[1], torch.cat([direct[[1, 3]], flipped[[1, 3]]]).mean(dim=(0, 2, 3)), atol=1e-5)
    assert torch.equal(prototypes[2], torch.zeros(extractor.channels))


def test_base_stage_overfits_fixed_features():
    """A small reconstructor trained through `fit_stage` drives the MSE far below its start on smooth features."""
    torch.manual_seed(0)
    yy, xx = torch.meshgrid(torch.linspace(0, 3, 6), torch.linspace(0, 3, 6), indexing="ij")
    basis = torch.stack([torch.sin(yy * f + p) * torch.cos(xx * f) for f in (0.5, 1.0) for p in (0.0, 1.0)])
    feats = torch.einsum("nb,cb,bhw->nchw", torch.rand(16, 4) + 0.5, torch.randn(16, 4), basis)
    cache = FeatureCache(feats, torch.zeros(16, dtype=torch.long))
    model = BaseReconstructor(16, (6, 6), small_cfg(jitter_scale=0.0))
    stage = BaseStage(model, cache)
    initial = stage.loss(model.eval(), feats, torch.Generator()).item()
    cfg = StageTrainConfig(epochs=2, iters_per_epoch=60, batch_size=8, lr=3e-3, warmup_iters=10)
    losses = []
    fit_stage(stage, cfg, torch.device("cpu"), seed=0, on_epoch=lambda r: losses.append(r.metrics["train_loss"]))
    final = stage.loss(model.eval(), feats, torch.Generator()).item()
    assert final < 0.2 * initial
    assert losses[-1] < losses[0]


def test_cosine_token_error_weighs_every_stage_alike():
    """1 − cos per stage, averaged: a large stage with a huge magnitude no longer drowns a small one."""
    feats = torch.ones(1, 6, 2, 2)
    feats[:, 2:] *= 100.0  # stage 2: 4 channels, 100× the magnitude of stage 1
    recon = feats.clone()
    recon[0, 0, 0, 0] = -1.0  # stage 1 (2 channels) turned by 90° at token (0, 0)
    model = BaseReconstructor(6, (2, 2), small_cfg(distance="cosine", neighbor_size=1), stage_channels=[2, 4])
    err = model.token_error(feats, recon)
    assert err.shape == (1, 1, 2, 2)
    assert err[0, 0, 0, 0].item() == pytest.approx(0.5, abs=1e-5)  # (1 − cos 90°) / 2 stages
    assert err[0, 0, 1, 1].item() == pytest.approx(0.0, abs=1e-6)
    l2 = upsample_map(token_error(feats, recon), image_size=2)
    assert l2[0, 0, 0, 0].item() == pytest.approx(2.0, abs=1e-5)
    recon_big = feats.clone()
    recon_big[0, 2:, 1, 1] *= 1.01  # a 1 % change of the large stage: l2 4.0, cosine 0
    assert model.token_error(feats, recon_big)[0, 0, 1, 1].item() == pytest.approx(0.0, abs=1e-5)
    with pytest.raises(ModelError, match="do not add up"):
        BaseReconstructor(6, (2, 2), small_cfg(distance="cosine", neighbor_size=1), stage_channels=[2, 3])


def test_cosine_base_stage_trains_on_the_distance_its_map_shows():
    torch.manual_seed(0)
    feats = torch.randn(8, 6, 3, 3) + 2.0
    model = BaseReconstructor(6, (3, 3), small_cfg(distance="cosine", jitter_scale=0.0, neighbor_size=1), stage_channels=[2, 4])
    stage = BaseStage(model, FeatureCache(feats, torch.zeros(8, dtype=torch.long)))
    loss = stage.loss(model.eval(), feats, torch.Generator())
    assert loss.item() == pytest.approx(model.token_error(feats, model(feats)).mean().item(), rel=1e-5)

