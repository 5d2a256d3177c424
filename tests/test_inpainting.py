"""Masks, high frequencies and selected-timestep inpainting."""

import pytest
import torch

from dcad.core.config import RefinerConfig
from dcad.core.errors import ModelError
from dcad.core.model.denoiser import Denoiser
from dcad.core.model.noise import build_scheduler
from dcad.core.model.inpainting import InpaintingRefiner, ddim_schedule, high_frequency, inpainting_masks


def tiny_cfg(**overrides) -> RefinerConfig:
    base = dict(
        unet={"block_out_channels": [8, 16], "attention_levels": [False, False], "norm_num_groups": 4},
        patch_sizes=[4, 8],
        timesteps=[50, 200],
    )
    base.update(overrides)
    return RefinerConfig(**base)


# ---- masks -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "h, w, s, g", [(32, 32, 8, 2), (48, 40, 16, 2), (30, 17, 4, 3), (64, 64, 8, 4), (20, 28, 3, 9), (8, 8, 16, 2)]
)
def test_masks_cover_every_pixel_exactly_once(h, w, s, g):
    masks = inpainting_masks(h, w, s, g)
    assert masks.shape == (g, 1, h, w)
    assert set(masks.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(masks.sum(0), torch.ones(1, h, w))


@pytest.mark.parametrize("g", [2, 3, 4])
def test_every_group_masks_something(g):
    masks = inpainting_masks(64, 64, 8, g)
    assert (masks.flatten(1).sum(1) > 0).all()


def test_two_groups_make_a_checkerboard_of_cells():
    masks = inpainting_masks(32, 32, 8, 2)[0, 0]
    cells = masks[::8, ::8]
    assert torch.equal(cells, torch.tensor([[1.0, 0, 1, 0], [0, 1, 0, 1], [1, 0, 1, 0], [0, 1, 0, 1]]))
    blocks = masks.reshape(4, 8, 4, 8)  # constant over each s×s cell
    assert torch.equal(blocks.amax(dim=(1, 3)), blocks.amin(dim=(1, 3)))


def test_four_groups_surround_each_masked_cell_with_visible_cells():
    m = inpainting_masks(64, 64, 8, 4)[0, 0][::8, ::8]
    neighbours = torch.nn.functional.max_pool2d(m[None, None], 3, stride=1, padding=1)[0, 0] - m
    assert (neighbours[m.bool()] == 0).all()  # no masked cell touches another masked cell


def test_bad_mask_arguments_are_refused():
    with pytest.raises(ModelError, match="groups"):
        inpainting_masks(16, 16, 4, 1)


# ---- high frequency ----------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["gaussian", "laplacian"])
def test_high_frequency_keeps_fine_detail_and_drops_smooth_shading(kind):
    yy, xx = torch.meshgrid(torch.arange(64.0), torch.arange(64.0), indexing="ij")
    smooth = (0.5 + 0.3 * torch.sin(xx / 20) * torch.cos(yy / 25)).expand(1, 3, 64, 64)
    fine = smooth.clone()
    fine[..., 30:32, 10:50] += 0.5  # a thin bright scratch
    hf_smooth, hf_fine = high_frequency(smooth, kind, 1.5), high_frequency(fine, kind, 1.5)
    assert hf_smooth[..., 8:-8, 8:-8].abs().max() < 0.01
    assert hf_fine[..., 30:32, 10:50].mean() > 0.2
    assert high_frequency(torch.full((2, 3, 16, 16), 0.7), kind, 2.0).abs().max() < 1e-5


def test_inner_sigma_makes_a_band_pass_that_drops_pixel_noise():
    g = torch.Generator().manual_seed(0)
    noise = 0.2 * torch.randn(1, 3, 64, 64, generator=g)  # pixel-level texture a denoiser cannot reproduce
    blob = torch.zeros(1, 3, 64, 64)
    blob[..., 28:36, 28:36] = 0.5  # a mid-sized defect
    plain = high_frequency(noise, "gaussian", 4.0).abs().mean()
    band = high_frequency(noise, "gaussian", 4.0, inner_sigma=1.5).abs().mean()
    assert band < 0.3 * plain
    assert high_frequency(blob, "gaussian", 4.0, inner_sigma=1.5)[..., 30:34, 30:34].mean() > 0.1


def test_unknown_high_frequency_kind_is_named():
    with pytest.raises(ModelError, match="wavelet"):
        high_frequency(torch.zeros(1, 3, 8, 8), "wavelet", 1.0)


# ---- inpainting --------------------------------------------------------------------------------------


def make_refiner(cfg=None, categories=2, seed=0):
    cfg = cfg or tiny_cfg()
    torch.manual_seed(seed)
    return InpaintingRefiner(Denoiser(cfg, categories), cfg, build_scheduler(cfg.scheduler))


def batch(n=2, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=g), torch.randn(n, 1, size, size, generator=g), torch.tensor([0, 1] * (n // 2))


def test_inpainting_shape_and_range():
    refiner = make_refiner()
    images, base, labels = batch()
    out = refiner.inpaint(images, base, labels)
    assert out.shape == (2, 2, 2, 3, 32, 32)
    assert out.min() >= 0 and out.max() <= 1


def test_fixed_seed_gives_identical_inpainting_independent_of_batch_and_chunking():
    refiner = make_refiner()
    images, base, labels = batch(4)
    first = refiner.inpaint(images, base, labels)
    assert torch.equal(first, refiner.inpaint(images, base, labels))
    alone = refiner.inpaint(images[2:3], base[2:3], labels[2:3])
    assert torch.allclose(alone[0], first[2], atol=1e-5)  # same noise for every image, whatever its batch
    small = make_refiner(tiny_cfg(max_batch=3))
    assert torch.allclose(small.inpaint(images, base, labels), first, atol=1e-5)


def test_seed_changes_the_noise():
    images, base, labels = batch()
    a = make_refiner().inpaint(images, base, labels)
    b = make_refiner(tiny_cfg(seed=99)).inpaint(images, base, labels)
    assert not torch.allclose(a, b, atol=1e-3)


def count_unet_calls(refiner):
    calls = []
    refiner.denoiser.unet.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[0]))
    return calls


def test_all_configurations_go_through_one_batched_call():
    refiner = make_refiner()  # 2 timesteps × 2 scales × 2 groups
    calls = count_unet_calls(refiner)
    images, base, labels = batch(2)
    refiner.inpaint(images, base, labels)
    assert calls == [16]


def test_max_batch_chunks_the_calls():
    refiner = make_refiner(tiny_cfg(max_batch=5))
    calls = count_unet_calls(refiner)
    refiner.inpaint(*batch(2))
    assert calls == [5, 5, 5, 1]


def test_guidance_doubles_the_batch_only_when_it_matters():
    guided = make_refiner(tiny_cfg(guidance_scale=2.0))
    calls = count_unet_calls(guided)
    guided.inpaint(*batch(2))
    assert sum(calls) == 32 and max(calls) <= 32
    plain = make_refiner(tiny_cfg(guidance_scale=2.0, class_conditioning=False))
    calls = count_unet_calls(plain)
    plain.inpaint(*batch(2))
    assert sum(calls) == 16


class MaskEcho(Denoiser):
    """Predicts x0 = 2·mask − 1 (the mask in [0,1] units): pasting must take masked regions only."""

    def forward(self, x_t, t, context=None, mask=None, base_map=None, class_labels=None):
        return (2 * mask - 1).expand_as(x_t)


def test_pasting_takes_each_pixel_from_the_group_that_masked_it():
    cfg = tiny_cfg(scheduler={"prediction_type": "sample"})
    refiner = InpaintingRefiner(MaskEcho(cfg, 2), cfg)
    out = refiner.inpaint(*batch(2))
    assert torch.equal(out, torch.ones_like(out))


class Oracle(Denoiser):
    """Knows the clean image: predicts x0 itself ("sample") or the noise that x_t implies ("epsilon")."""

    clean: torch.Tensor

    def forward(self, x_t, t, context=None, mask=None, base_map=None, class_labels=None):
        clean = self.clean.repeat(x_t.shape[0] // self.clean.shape[0], 1, 1, 1)
        if self.cfg.scheduler.prediction_type == "sample":
            return clean
        return old_predict_eps(clean, x_t, t, build_scheduler(self.cfg.scheduler).alphas_cumprod)


@pytest.mark.parametrize("prediction_type", ["sample", "epsilon"])
@pytest.mark.parametrize("steps", [1, 3])
def test_ddim_chain_with_an_exact_model_returns_the_image(prediction_type, steps):
    cfg = tiny_cfg(scheduler={"prediction_type": prediction_type}, ddim_steps=steps, patch_sizes=[8], timesteps=[300])
    oracle = Oracle(cfg, 1)
    images, base, _ = batch(1)
    oracle.clean = images * 2 - 1
    out = InpaintingRefiner(oracle, cfg).inpaint(images, base, torch.tensor([0]))
    assert torch.allclose(out[:, 0, 0], images, atol=1e-4)


def test_ddim_schedule_descends_from_tau():
    assert ddim_schedule(250, 1) == [250]
    assert ddim_schedule(250, 3) == [250, 167, 83]
    assert min(ddim_schedule(2, 4)) >= 1


def test_refinement_maps_zero_for_perfect_inpainting_and_peak_on_a_scratch():
    refiner = make_refiner(tiny_cfg(timesteps=[100], patch_sizes=[8]))
    images, _, _ = batch(1)
    perfect = images[:, None, None].repeat(1, 1, 1, 1, 1, 1)
    assert refiner.refinement_maps(images, perfect).abs().max() < 1e-6
    scratched = images.clone()
    scratched[..., 15:17, 4:28] = 1.0
    maps = refiner.refinement_maps(scratched, perfect)
    assert maps.shape == (1, 1, 1, 32, 32)
    inside, outside = maps[..., 15:17, 6:26].mean(), maps[..., :8, :].mean()
    assert inside > 5 * outside


def test_wrong_image_size_is_a_clear_error():
    refiner = make_refiner(tiny_cfg(space_to_depth=2))
    images, base, labels = batch(2, size=30)
    with pytest.raises(ModelError, match="multiples of 4"):
        refiner.inpaint(images, base, labels)


def test_timesteps_outside_the_schedule_are_named():
    with pytest.raises(ModelError, match="timesteps"):
        make_refiner(tiny_cfg(timesteps=[1000]))


# ---- the scheduler path gives what the hand-written formulas gave ---------------------------------------


def _old_alpha_terms(t, alphas_cumprod, like):
    a = alphas_cumprod.to(device=like.device, dtype=like.dtype)[t.to(like.device).long()]
    a = a.reshape(-1, *([1] * (like.dim() - 1)))
    return a.sqrt(), (1.0 - a).sqrt()


def old_q_sample(x0, noise, t, alphas_cumprod):
    sqrt_a, sqrt_1ma = _old_alpha_terms(t, alphas_cumprod, x0)
    return sqrt_a * x0 + sqrt_1ma * noise


def old_predict_x0(model_output, x_t, t, alphas_cumprod, prediction_type):
    if prediction_type == "sample":
        return model_output
    sqrt_a, sqrt_1ma = _old_alpha_terms(t, alphas_cumprod, x_t)
    if prediction_type == "epsilon":
        return (x_t - sqrt_1ma * model_output) / sqrt_a
    return sqrt_a * x_t - sqrt_1ma * model_output


def old_predict_eps(x0, x_t, t, alphas_cumprod):
    sqrt_a, sqrt_1ma = _old_alpha_terms(t, alphas_cumprod, x_t)
    return (x_t - sqrt_a * x0) / sqrt_1ma.clamp_min(1e-8)


def old_predict_clean(refiner, x, noise, tau, mask, base, labels):
    """The refiner's x̂0 as written before the scheduler's public API was used (q_sample, predict_x0, DDIM loop)."""
    ac = refiner.scheduler.alphas_cumprod.float()
    kind = refiner.cfg.scheduler.prediction_type
    x_t = old_q_sample(x, noise, tau, ac)
    context = x * (1.0 - mask)
    n = refiner.cfg.ddim_steps
    schedule = torch.tensor([ddim_schedule(int(t), n) for t in tau.tolist()])
    for k in range(n):
        t = schedule[:, k]
        x0 = old_predict_x0(refiner._model(x_t, t, context, mask, base, labels), x_t, t, ac, kind)
        if k == n - 1:
            break
        t_next = schedule[:, k + 1]
        moved = old_q_sample(x0, old_predict_eps(x0, x_t, t, ac), t_next, ac)
        x_t = mask * moved + (1.0 - mask) * old_q_sample(x, noise, t_next, ac)
    return x0


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("steps", [1, 3])
def test_scheduler_path_matches_the_old_formulas(prediction_type, steps):
    cfg = tiny_cfg(scheduler={"prediction_type": prediction_type}, ddim_steps=steps)
    refiner = make_refiner(cfg)
    g = torch.Generator().manual_seed(3)
    x = torch.rand(6, 3, 16, 16, generator=g) * 2 - 1
    noise = torch.randn(6, 3, 16, 16, generator=g)
    tau = torch.tensor([50, 200, 50, 999, 1, 200])  # several τ in one chunk, the ends of the schedule included
    mask = inpainting_masks(16, 16, 4, 2)[torch.tensor([0, 1, 1, 0, 0, 1])]
    base, labels = torch.randn(6, 1, 16, 16, generator=g), torch.tensor([0, 1, 2, 0, 1, 2])
    with torch.no_grad():
        new = refiner._predict_clean(x, noise, tau, mask, base, labels)
        old = old_predict_clean(refiner, x, noise, tau, mask, base, labels)
    assert torch.allclose(new, old, atol=1e-5, rtol=1e-5)
    images, base_maps, class_labels = batch(2, 16)
    maps = refiner.refinement_maps(images, refiner.inpaint(images, base_maps, class_labels))
    refiner._predict_clean = lambda *args: old_predict_clean(refiner, *args)
    assert torch.allclose(maps, refiner.refinement_maps(images, refiner.inpaint(images, base_maps, class_labels)), atol=1e-5)
