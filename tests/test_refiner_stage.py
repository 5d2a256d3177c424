"""The refiner's training stage: what the loss sees, its randomness, and that training makes refinement sharp."""

import math

import pytest
import torch
import torch.nn.functional as F

from dcad.core.config import RefinerConfig, StageTrainConfig
from dcad.core.errors import DatasetError, ModelError
from dcad.core.model.denoiser import Denoiser
from dcad.core.model.noise import build_scheduler
from dcad.core.model.fusion import gaussian_blur
from dcad.core.model.inpainting import InpaintingRefiner
from dcad.train.refiner_stage import RefinerStage


def tiny_cfg(**overrides) -> RefinerConfig:
    base = dict(
        unet={"block_out_channels": [8, 16], "attention_levels": [False, False], "norm_num_groups": 4},
        patch_sizes=[4, 8],
        crop_size=16,
    )
    base.update(overrides)
    return RefinerConfig(**base)


def make_stage(cfg=None, n=6, size=24, categories=3, base=True):
    cfg = cfg or tiny_cfg()
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    images = torch.rand(n, 3, size, size, generator=g)
    base_maps = images[:, :1].clone() if base else None  # the base map equals the red channel: crops must match
    cats = torch.arange(n) % categories
    denoiser = Denoiser(cfg, categories)
    return RefinerStage(denoiser, build_scheduler(cfg.scheduler), cfg, images, base_maps, cats), images


def full_batch(stage):
    items = [stage.dataset()[i] for i in range(len(stage.dataset()))]
    return {k: torch.stack([it[k] for it in items]) for k in items[0]}


class Recorder(torch.nn.Module):
    """Wraps the denoiser and keeps what it was given and what it predicted (with its gradient)."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x_t, t, context, mask, base, labels):
        self.seen = dict(x_t=x_t, t=t, context=context, mask=mask, base=base, labels=labels)
        self.out = self.inner(x_t, t, context, mask, base, labels)
        self.out.retain_grad()
        return self.out


def test_loss_only_sees_the_masked_region():
    stage, _ = make_stage()
    rec = Recorder(stage.denoiser)
    loss = stage.loss(rec, full_batch(stage), torch.Generator().manual_seed(3))
    loss.backward()
    mask = rec.seen["mask"].expand_as(rec.out).bool()
    assert rec.out.grad[~mask].abs().max() == 0
    assert (rec.out.grad[mask] != 0).float().mean() > 0.99
    assert 0.3 < mask.float().mean() < 0.7  # one group of a checkerboard per sample


def test_inputs_are_consistent_crops():
    stage, _ = make_stage()
    rec = Recorder(stage.denoiser)
    stage.loss(rec, full_batch(stage), torch.Generator().manual_seed(4))
    seen = rec.seen
    assert seen["x_t"].shape == (6, 3, 16, 16)
    visible = 1 - seen["mask"]
    red = (seen["context"][:, :1] + 1) / 2  # the context is x in [-1, 1]
    assert torch.allclose(seen["base"] * visible, red * visible, atol=1e-6)  # base crop matches the image crop
    assert (seen["context"] * seen["mask"]).abs().max() == 0
    assert seen["t"].min() >= 1 and seen["t"].max() < 1000


def test_masks_vary_in_scale_and_group_across_samples():
    stage, _ = make_stage(n=16)
    rec = Recorder(stage.denoiser)
    stage.loss(rec, full_batch(stage), torch.Generator().manual_seed(5))
    distinct = {tuple(m.flatten().tolist()) for m in rec.seen["mask"]}
    assert len(distinct) == 4  # 2 scales × 2 groups


def test_same_generator_same_loss_and_other_seed_other_loss():
    stage, _ = make_stage()
    batch = full_batch(stage)
    a = stage.loss(stage.denoiser, batch, torch.Generator().manual_seed(7))
    b = stage.loss(stage.denoiser, batch, torch.Generator().manual_seed(7))
    c = stage.loss(stage.denoiser, batch, torch.Generator().manual_seed(8))
    assert a.item() == b.item() and a.item() != c.item()


@pytest.mark.parametrize("dropout, nulls", [(0.0, 0), (1.0, 6)])
def test_condition_dropout_replaces_labels_by_the_null_class(dropout, nulls):
    stage, _ = make_stage(tiny_cfg(cond_dropout=dropout))
    rec = Recorder(stage.denoiser)
    batch = full_batch(stage)
    stage.loss(rec, batch, torch.Generator().manual_seed(1))
    labels = rec.seen["labels"]
    assert int((labels == stage.denoiser.null_class).sum()) == nulls
    if nulls == 0:
        assert torch.equal(labels, batch["category"])


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_loss_is_zero_for_the_exact_target(prediction_type):
    """A model returning the true target (ε, v or x0) has zero loss: the targets match the noising."""
    cfg = tiny_cfg(scheduler={"prediction_type": prediction_type})
    stage, _ = make_stage(cfg)
    stage.samples.images = torch.rand(6, 3, 1, 1).expand(6, 3, 24, 24)  # flat colours: x is known from the context
    sched = stage.scheduler

    class Exact(torch.nn.Module):
        def forward(self, x_t, t, context, mask, base, labels):
            x = (context.sum(dim=(2, 3), keepdim=True) / (1 - mask).sum(dim=(2, 3), keepdim=True)).expand_as(x_t)
            a = sched.alphas_cumprod[t].view(-1, 1, 1, 1)
            eps = (x_t - a.sqrt() * x) / (1 - a).sqrt()
            return {"epsilon": eps, "sample": x, "v_prediction": sched.get_velocity(x, eps, t)}[prediction_type]

    assert stage.loss(Exact(), full_batch(stage), torch.Generator().manual_seed(2)).item() < 1e-8
    assert stage.loss(stage.denoiser, full_batch(stage), torch.Generator().manual_seed(2)).item() > 1e-3


def test_uint8_images_are_scaled():
    stage, images = make_stage()
    batch = full_batch(stage)
    as_bytes = dict(batch, image=(batch["image"] * 255).round().to(torch.uint8))
    a = stage.loss(stage.denoiser, batch, torch.Generator().manual_seed(1))
    b = stage.loss(stage.denoiser, as_bytes, torch.Generator().manual_seed(1))
    assert abs(a.item() - b.item()) < 0.02 * a.item()


def test_dataset_items_and_missing_base_maps():
    stage, images = make_stage(base=False, cfg=tiny_cfg(base_map_channel=False))
    item = stage.dataset()[2]
    assert torch.equal(item["image"], images[2]) and item["category"] == 2
    assert item["base_map"].shape == (1, 24, 24)
    loss = stage.loss(stage.denoiser, full_batch(stage), torch.Generator().manual_seed(0))
    assert math.isfinite(loss.item())


def test_bad_inputs_are_named():
    cfg = tiny_cfg()
    den = Denoiser(cfg, 2)
    with pytest.raises(DatasetError, match="3 category indices"):
        RefinerStage(den, None, cfg, torch.rand(4, 3, 16, 16), None, torch.zeros(3, dtype=torch.long))
    with pytest.raises(ModelError, match="crop_size=17"):
        RefinerStage(den, None, tiny_cfg(crop_size=17), torch.rand(4, 3, 16, 16), None, torch.zeros(4, dtype=torch.long))


def test_validate_delegates():
    stage, _ = make_stage()
    assert stage.validate(stage.denoiser) == {}
    stage.validate_fn = lambda module: {"val_x": 1.5}
    assert stage.validate(stage.denoiser) == {"val_x": 1.5}


def test_training_through_fit_stage_lowers_the_loss():
    fit_stage = pytest.importorskip("dcad.train.loop").fit_stage
    cfg = tiny_cfg(scheduler={"prediction_type": "sample"}, patch_sizes=[8], space_to_depth=2)
    stage, _ = make_stage(cfg, n=8, size=32)
    stage.samples.images = smooth_texture(8, 32, seed=0)
    batch = full_batch(stage)

    def held_out_loss():
        with torch.no_grad():
            return stage.loss(stage.denoiser, batch, torch.Generator().manual_seed(123)).item()

    before = held_out_loss()
    fit_stage(stage, StageTrainConfig(epochs=1, iters_per_epoch=40, batch_size=8, lr=3e-3), torch.device("cpu"), seed=0)
    assert held_out_loss() < 0.5 * before


# ---- quality: the refinement is sharper than a coarse map -------------------------------------------------


def smooth_texture(n, size, seed, period=12.0):
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(size * 1.0), torch.arange(size * 1.0), indexing="ij")
    phase = torch.rand(n, 2, 1, 1, generator=g) * 2 * math.pi
    tex = 0.5 + 0.2 * torch.sin(2 * math.pi * xx / period + phase[:, 0]) * torch.cos(2 * math.pi * yy / period + phase[:, 1])
    return (tex.unsqueeze(1) * torch.tensor([1.0, 0.8, 0.6]).reshape(1, 3, 1, 1)).clamp(0, 1)


def mass_inside(maps, gt):
    return ((maps * gt).flatten(1).sum(1) / maps.flatten(1).sum(1)).mean().item()


@pytest.mark.slow
def test_trained_refinement_is_sharper_than_a_coarse_map():
    fit_stage = pytest.importorskip("dcad.train.loop").fit_stage
    cfg = RefinerConfig(
        unet={"block_out_channels": [16, 32, 32], "attention_levels": [False] * 3, "norm_num_groups": 8},
        scheduler={"prediction_type": "sample"},
        patch_sizes=[8],
        timesteps=[100],
        crop_size=32,
        class_conditioning=False,
        base_map_channel=False,
        space_to_depth=2,
        train_timestep_max=400,
    )
    torch.manual_seed(0)
    denoiser = Denoiser(cfg, 1)
    images = smooth_texture(32, 64, seed=0)
    stage = RefinerStage(denoiser, None, cfg, images, None, torch.zeros(32, dtype=torch.long))
    fit_stage(stage, StageTrainConfig(epochs=1, iters_per_epoch=120, batch_size=16, lr=2e-3), torch.device("cpu"), seed=0)

    test = smooth_texture(4, 64, seed=123)
    gt = torch.zeros(4, 1, 64, 64)
    for k in range(4):  # a thin (2 px) bright scratch per image
        gt[k, 0, 18 + 7 * k : 20 + 7 * k, 10:54] = 1
    scratched = torch.where(gt.bool(), torch.tensor(0.95), test)
    refiner = InpaintingRefiner(denoiser, cfg)
    refine = refiner.refinement_maps(scratched, refiner.inpaint(scratched, None, None))[:, 0, 0:1]
    coarse = gaussian_blur(F.interpolate(F.avg_pool2d(gt, 8), scale_factor=8, mode="nearest"), 2.0)  # stride-8 base

    assert mass_inside(refine, gt) > 1.2 * mass_inside(coarse, gt)
    assert refine[gt.bool()].mean() > 5 * refine[~gt.bool()].mean()
