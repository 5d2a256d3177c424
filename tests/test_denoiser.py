"""The inpainting denoiser: channel layout, conditioning, guidance and the x̂0 algebra."""

import pytest
import torch

from dcad.core.config import RefinerConfig
from dcad.core.errors import ModelError
from dcad.core.model.denoiser import Denoiser, input_channels
from dcad.core.model.noise import build_scheduler, load_scheduler, predict_x0


def tiny_cfg(**overrides) -> RefinerConfig:
    base = dict(unet={"block_out_channels": [8, 16], "attention_levels": [False, False], "norm_num_groups": 4})
    base.update(overrides)
    return RefinerConfig(**base)


def inputs(batch=2, size=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    x_t = torch.randn(batch, 3, size, size, generator=g)
    context = torch.randn(batch, 3, size, size, generator=g)
    mask = (torch.rand(batch, 1, size, size, generator=g) > 0.5).float()
    base = torch.randn(batch, 1, size, size, generator=g)
    t = torch.tensor([10, 500])[:batch]
    labels = torch.tensor([0, 2])[:batch]
    return x_t, t, context, mask, base, labels


@pytest.mark.parametrize(
    "ttc, base_channel, expected",
    [(True, True, 8), (True, False, 7), (False, True, 4), (False, False, 3)],
)
@pytest.mark.parametrize("r", [1, 2])
def test_channel_count_follows_switches(ttc, base_channel, expected, r):
    cfg = tiny_cfg(test_time_conditioning=ttc, base_map_channel=base_channel, space_to_depth=r)
    assert input_channels(cfg) == expected
    model = Denoiser(cfg, num_categories=3)
    assert model.unet.conv_in.in_channels == expected * r * r
    assert model.unet.conv_out.out_channels == 3 * r * r
    x_t, t, context, mask, base, labels = inputs(size=16)
    out = model(x_t, t, context if ttc else None, mask if ttc else None, base if base_channel else None, labels)
    assert out.shape == x_t.shape


def test_class_embedding_has_a_null_class():
    model = Denoiser(tiny_cfg(), num_categories=3)
    assert model.null_class == 3
    assert model.unet.class_embedding.num_embeddings == 4
    assert Denoiser(tiny_cfg(class_conditioning=False), 3).unet.class_embedding is None


def test_class_label_changes_the_output():
    torch.manual_seed(0)
    model = Denoiser(tiny_cfg(), num_categories=3).eval()
    torch.nn.init.normal_(model.unet.class_embedding.weight, std=1.0)
    x_t, t, context, mask, base, _ = inputs()
    a = model(x_t, t, context, mask, base, torch.tensor([0, 0]))
    b = model(x_t, t, context, mask, base, torch.tensor([1, 1]))
    assert not torch.allclose(a, b, atol=1e-4)


def test_masked_context_is_hidden_from_the_network():
    """Whatever lies under the mask in the context does not reach the UNet."""
    model = Denoiser(tiny_cfg(), 3).eval()
    x_t, t, context, mask, base, labels = inputs()
    other = context + 5.0 * mask
    assert torch.allclose(model(x_t, t, context, mask, base, labels), model(x_t, t, other, mask, base, labels))


def test_guidance_mixes_conditional_and_unconditional():
    torch.manual_seed(0)
    model = Denoiser(tiny_cfg(), num_categories=3).eval()
    torch.nn.init.normal_(model.unet.class_embedding.weight, std=1.0)
    x_t, t, context, mask, base, labels = inputs()
    cond = model(x_t, t, context, mask, base, labels)
    uncond = model(x_t, t, context, mask, base, torch.full_like(labels, model.null_class))
    assert torch.allclose(model.guided(x_t, t, context, mask, base, labels, 1.0), cond, atol=1e-5)
    assert torch.allclose(model.guided(x_t, t, context, mask, base, labels, 0.0), uncond, atol=1e-5)
    w3 = model.guided(x_t, t, context, mask, base, labels, 3.0)
    assert torch.allclose(w3, uncond + 3.0 * (cond - uncond), atol=1e-4)


def test_guidance_uses_one_unet_call():
    model = Denoiser(tiny_cfg(), 3).eval()
    calls = []
    model.unet.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[0]))
    model.guided(*inputs(), guidance_scale=2.0)
    assert calls == [4]


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("schedule", ["linear", "scaled_linear", "squaredcos_cap_v2"])
def test_predict_x0_inverts_add_noise(prediction_type, schedule):
    cfg = tiny_cfg(scheduler={"prediction_type": prediction_type, "beta_schedule": schedule})
    scheduler = build_scheduler(cfg.scheduler)
    g = torch.Generator().manual_seed(1)
    x0 = torch.rand(4, 3, 8, 8, generator=g) * 2 - 1
    noise = torch.randn(4, 3, 8, 8, generator=g)
    t = torch.tensor([1, 100, 500, 900])
    x_t = scheduler.add_noise(x0, noise, t)
    target = {"epsilon": noise, "sample": x0, "v_prediction": scheduler.get_velocity(x0, noise, t)}[prediction_type]
    assert torch.allclose(predict_x0(scheduler, target, t, x_t), x0, atol=1e-3)


def test_scheduler_follows_config():
    a = build_scheduler(tiny_cfg().scheduler)
    b = build_scheduler(tiny_cfg(scheduler={"num_train_timesteps": 200, "beta_schedule": "squaredcos_cap_v2"}).scheduler)
    assert len(a.alphas_cumprod) == 1000 and len(b.alphas_cumprod) == 200
    assert b.config.beta_schedule == "squaredcos_cap_v2"
    assert torch.all(a.alphas_cumprod[1:] < a.alphas_cumprod[:-1])
    assert type(a).__name__ == "DDIMScheduler" and not a.config.clip_sample


def test_the_config_names_any_capable_scheduler_class(tmp_path):
    cfg = tiny_cfg(scheduler={"class_name": "DDPMScheduler", "num_train_timesteps": 300, "variance_type": "fixed_large"})
    scheduler = build_scheduler(cfg.scheduler)
    assert type(scheduler).__name__ == "DDPMScheduler" and scheduler.config.variance_type == "fixed_large"
    scheduler.save_config(tmp_path)
    assert (tmp_path / "scheduler_config.json").is_file()
    again = load_scheduler(tmp_path)
    assert type(again).__name__ == "DDPMScheduler"
    assert all(again.config[k] == v for k, v in scheduler.config.items() if not k.startswith("_"))


@pytest.mark.parametrize("scheduler, needle", [
    ({"class_name": "EulerDiscreteScheduler"}, "cannot do"),
    ({"class_name": "UNet2DModel"}, "not a diffusers scheduler class"),
    ({"class_name": "NoSuchScheduler"}, "not a diffusers scheduler class"),
    ({"variance_typo": "fixed_small"}, "takes no variance_typo"),
])
def test_a_scheduler_the_refiner_cannot_use_is_refused_in_one_line(scheduler, needle):
    with pytest.raises(ModelError, match=needle) as err:
        build_scheduler(tiny_cfg(scheduler=scheduler).scheduler)
    assert "\n" not in str(err.value)


def test_size_not_a_multiple_is_a_clear_error():
    model = Denoiser(tiny_cfg(space_to_depth=2), 3)
    x_t, t, context, mask, base, labels = inputs(size=16)
    with pytest.raises(ModelError, match="multiples of 4"):
        model(x_t[..., :14, :14], t, context[..., :14, :14], mask[..., :14, :14], base[..., :14, :14], labels)


def test_missing_base_map_is_a_clear_error():
    model = Denoiser(tiny_cfg(), 3)
    x_t, t, context, mask, _, labels = inputs()
    with pytest.raises(ModelError, match="base map"):
        model(x_t, t, context, mask, None, labels)


def test_bad_class_label_is_a_clear_error():
    model = Denoiser(tiny_cfg(), 3)
    x_t, t, context, mask, base, _ = inputs()
    with pytest.raises(ModelError, match="null class"):
        model(x_t, t, context, mask, base, torch.tensor([0, 7]))


def test_inconsistent_unet_config_is_named():
    cfg = tiny_cfg(unet={"block_out_channels": [8, 16], "attention_levels": [False], "norm_num_groups": 4})
    with pytest.raises(ModelError, match="attention_levels"):
        Denoiser(cfg, 3)
