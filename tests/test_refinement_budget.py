"""Adaptive refinement (`refiner.budget`): windows at the base map's peaks, the cascade, and NaN-aware statistics."""

import math
import warnings

import pytest
import torch

from dcad.core.config import ConfigError, load_config
from dcad.core.model.drdc import DRDC
from dcad.core.model.fusion import RefinementStats, gaussian_blur
from dcad.core.model.windows import crop_windows, paste_windows, peak_windows


def tiny_model(*overrides: str) -> DRDC:
    torch.manual_seed(0)
    cfg = load_config("tiny", overrides=list(overrides))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return DRDC(cfg, ["a", "b"]).eval()


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_windows_cover_the_peaks_on_the_grid_without_overlap():
    score = torch.zeros(2, 1, 64, 64)
    score[0, 0, 40:44, 10:14] = 5.0  # strongest blob
    score[0, 0, 4:8, 50:54] = 3.0  # second blob
    score[1, 0, 60:64, 60:64] = 1.0  # corner blob
    corners = peak_windows(score, count=2, size=16, align=8)
    assert corners.shape == (2, 2, 2)
    assert (corners % 8 == 0).all() and (corners >= 0).all() and (corners + 16 <= 64).all()
    for (r, c), (pr, pc) in zip(corners[0].tolist(), [(40, 10), (4, 50)]):
        assert r <= pr and pr + 4 <= r + 16 and c <= pc and pc + 4 <= c + 16  # each blob inside its window
    assert corners[1, 0].tolist() == [48, 48]
    (r0, c0), (r1, c1) = corners[1].tolist()
    assert abs(r0 - r1) >= 16 or abs(c0 - c1) >= 16  # the second window does not overlap the first


def test_more_windows_than_fit_repeat_the_best_one():
    corners = peak_windows(torch.rand(1, 1, 32, 32), count=3, size=32, align=8)
    assert corners.tolist() == [[[0, 0]] * 3]


def test_crop_then_paste_restores_the_windows_and_marks_the_rest_unrefined():
    x = torch.rand(2, 3, 32, 32)
    corners = torch.tensor([[[0, 8], [16, 16]], [[8, 0], [8, 16]]])
    crops = crop_windows(x, corners, 16)
    assert crops.shape == (4, 3, 16, 16)
    assert torch.equal(crops[3], x[1, :, 8:24, 16:32])
    back = paste_windows(crops, corners, 32, 32)
    inside = torch.zeros(2, 32, 32, dtype=torch.bool)
    for i, row in enumerate(corners.tolist()):
        for r, c in row:
            inside[i, r:r + 16, c:c + 16] = True
    inside = inside[:, None].expand_as(x)
    assert torch.equal(back[inside], x[inside])
    assert back[~inside].isnan().all()


def test_one_window_the_size_of_the_image_refines_exactly_like_the_whole_image():
    whole = tiny_model("refiner.budget.windows=0")
    windowed = tiny_model("refiner.budget.windows=1", "refiner.budget.window_size=64")
    windowed.load_state_dict(whole.state_dict())
    images = torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    base_z = torch.randn(3, 1, 64, 64, generator=torch.Generator().manual_seed(2))
    cats = torch.tensor([0, 1, 0])
    assert torch.allclose(windowed.refinement(images, base_z, cats), whole.refinement(images, base_z, cats), atol=1e-5)


def test_windows_refine_only_their_pixels_and_the_rest_standardises_to_normal():
    model = tiny_model("refiner.budget.windows=2", "refiner.budget.window_size=16")
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    base_z = torch.zeros(2, 1, 64, 64)
    base_z[:, :, 20:30, 20:30] = 4.0
    maps = model.refinement(images, base_z, torch.tensor([0, 1]))
    t, s = len(model.cfg.refiner.timesteps), len(model.cfg.refiner.patch_sizes)
    assert maps.shape == (2, t, s, 64, 64)
    refined = maps.isfinite()
    assert refined.flatten(1).sum(1).tolist() == [2 * 16 * 16 * t * s] * 2
    assert refined[:, :, :, 20:30, 20:30].all()  # the suspicious region is refined
    model.calibration.refine.fit([(maps, torch.tensor([0, 1]))])
    z = model.calibration.refine.standardise(maps, torch.tensor([0, 1]))
    assert z.isfinite().all() and (z[~refined] == 0).all() and z[refined].abs().max() > 0


def test_the_cascade_skips_images_below_the_fitted_base_score():
    model = tiny_model("refiner.budget.skip_quantile=0.5", "refiner.budget.windows=0")
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(4))
    base_z = torch.zeros(2, 1, 64, 64)
    base_z[1, :, 10:30, 10:30] = 3.0
    scores = model.base_scores(base_z)
    model.calibration.refine_skip_score.fill_(float(scores.mean()))
    maps = model.refinement(images, base_z, torch.tensor([0, 0]))
    assert maps[0].isnan().all() and maps[1].isfinite().all()
    model.calibration.refine_skip_score.fill_(float(scores.max()) + 1)
    assert model.refinement(images, base_z, torch.tensor([0, 0])).isnan().all()


def test_the_cascade_threshold_is_the_quantile_of_normal_validation_base_scores():
    from dcad.train.calibrate import fit_base_statistics

    model = tiny_model("refiner.budget.skip_quantile=0.25")
    gen = torch.Generator().manual_seed(5)
    items = [{"image": torch.rand(3, 64, 64, generator=gen), "label": i % 3 == 2, "category_index": i % 2}
             for i in range(9)]
    items = [dict(item, label=int(item["label"])) for item in items]
    fit_base_statistics(model, items, 4, "cpu")
    normal = torch.stack([item["image"] for item in items if item["label"] == 0])
    feats = model.backbone(normal)
    base_z = model.calibration.standardise_base(model.base.anomaly_map(feats, model.base(feats), 64))
    expected = torch.quantile(model.base_scores(base_z).double(), 0.25).item()
    assert math.isclose(model.calibration.refine_skip_score.item(), expected, rel_tol=1e-5)
    off = tiny_model()
    fit_base_statistics(off, items, 4, "cpu")
    assert off.calibration.refine_skip_score.item() == float("-inf")


def test_statistics_leave_unrefined_pixels_out():
    gen = torch.Generator().manual_seed(6)
    maps = torch.rand(4, 1, 2, 16, 16, generator=gen) * 3 + 1
    holes = torch.rand(maps.shape, generator=gen) < 0.6
    stats = RefinementStats(1, 2, 2).fit([(maps.masked_fill(holes, float("nan")), torch.tensor([0, 0, 1, 1]))])
    for t_s in range(2):
        pooled = maps[:, 0, t_s][~holes[:, 0, t_s]].double()
        assert math.isclose(stats.mean[-1, 0, t_s].item(), pooled.mean().item(), rel_tol=1e-5)
        assert math.isclose(stats.std[-1, 0, t_s].item(), pooled.std(unbiased=False).item(), rel_tol=1e-4)
        first = maps[:2, 0, t_s][~holes[:2, 0, t_s]].double()
        assert math.isclose(stats.mean[0, 0, t_s].item(), first.mean().item(), rel_tol=1e-5)


def test_statistics_refuse_a_budget_that_skipped_every_normal_image():
    from dcad.core.errors import ModelError

    with pytest.raises(ModelError, match="skip_quantile"):
        RefinementStats(1, 1).fit([torch.full((2, 1, 1, 8, 8), float("nan"))])


def test_windows_with_per_pixel_statistics_are_refused_in_one_line():
    with pytest.raises(ConfigError, match="fusion.stats=scalar"):
        tiny_model("refiner.budget.windows=1", "fusion.stats=pixel")


def test_a_window_off_the_cell_grid_is_refused():
    from dcad.core.errors import ModelError

    model = tiny_model("refiner.budget.windows=1", "refiner.budget.window_size=20")
    with pytest.raises(ModelError, match="window_size=20"):
        model.refinement(torch.rand(1, 3, 64, 64), torch.zeros(1, 1, 64, 64), torch.tensor([0]))


def test_models_saved_before_the_cascade_load_and_refine_every_image(tmp_path):
    import json

    from safetensors.torch import save_file

    from dcad.core.model.model_dir import load_model

    model = tiny_model()
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "calibration.refine_skip_score"}
    save_file(state, str(tmp_path / "model.safetensors"))  # a format-1 directory written before the cascade
    (tmp_path / "config.yaml").write_text(model.cfg.to_yaml())
    (tmp_path / "dcad_model.json").write_text(json.dumps({"format": "dcad-model", "format_version": 1, "categories": ["a", "b"],
                                                          "image_threshold": 1.0, "pixel_threshold": 2.0}))
    fresh = load_model(tmp_path)
    assert fresh.calibration.refine_skip_score.item() == float("-inf")
    assert fresh.calibration.image_threshold.item() == 1.0


def test_the_budget_is_a_rescore_key():
    from dcad.train.shared_stages import stage_of

    assert stage_of("refiner.budget.windows") == stage_of("refiner.budget.skip_quantile") == "rescore"


def test_the_separable_blur_equals_torchvision_2d_kernel():
    from torchvision.transforms.functional import gaussian_blur as tv_blur

    x = torch.rand(2, 3, 37, 64)
    for sigma in (0.7, 2.0, 8.0):
        radius = min(math.ceil(3 * sigma), 36)
        ref = tv_blur(x.reshape(-1, 1, 37, 64), [2 * radius + 1] * 2, [sigma] * 2).reshape(x.shape)
        assert torch.allclose(gaussian_blur(x, sigma), ref, atol=1e-5)


def test_auto_precision_follows_the_hardware_flags():
    from dcad.core.model.precision import cpu_has_bfloat16, uses_bfloat16

    cpu = torch.device("cpu")
    assert uses_bfloat16("bfloat16", cpu) and not uses_bfloat16("float32", cpu)
    assert uses_bfloat16("auto", cpu) == cpu_has_bfloat16()
    assert cpu_has_bfloat16.__wrapped__("processor: 0\nflags\t\t: fpu sse avx512f avx512_bf16 avx512_vnni\n")
    assert cpu_has_bfloat16.__wrapped__("flags : fpu amx_bf16 amx_tile\n")
    assert not cpu_has_bfloat16.__wrapped__("flags : fpu sse avx2 avx512f\n")
    assert not cpu_has_bfloat16.__wrapped__("")


def test_bfloat16_refinement_stays_close_to_float32():
    exact = tiny_model("refiner.precision=float32")
    fast = tiny_model("refiner.precision=bfloat16")
    fast.load_state_dict(exact.state_dict())
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(7))
    base_z = torch.randn(2, 1, 64, 64, generator=torch.Generator().manual_seed(8))
    cats = torch.tensor([0, 1])
    a, b = exact.refinement(images, base_z, cats), fast.refinement(images, base_z, cats)
    refined = a.isfinite()
    assert torch.equal(refined, b.isfinite()) and b.dtype == torch.float32
    relative = (a[refined] - b[refined]).abs().mean() / a[refined].abs().mean()
    assert 0 < relative < 0.05  # bf16 really ran (not identical) and stayed within a few percent


def test_statistics_come_from_every_pixel_whatever_the_budget():
    from dcad.train.calibrate import fit_base_statistics, fit_refinement_statistics

    gen = torch.Generator().manual_seed(9)
    items = [{"image": torch.rand(3, 64, 64, generator=gen), "label": 0, "category_index": i % 2} for i in range(4)]
    windowed = tiny_model("refiner.budget.windows=1", "refiner.budget.skip_quantile=0.5")
    whole = tiny_model("refiner.budget.windows=0")
    whole.load_state_dict(windowed.state_dict())
    for model in (windowed, whole):
        fit_base_statistics(model, items, 4, "cpu")
        fit_refinement_statistics(model, items, 4, "cpu")
    assert torch.isfinite(windowed.calibration.refine_skip_score)  # the cascade is on, yet every image counts
    assert torch.allclose(windowed.calibration.refine.mean, whole.calibration.refine.mean)
    assert torch.allclose(windowed.calibration.refine.std, whole.calibration.refine.std)
