"""DRDC and its ablations from one trained model per dataset, and full reverse diffusion with its denoiser.

`SharedDRDC` trains the project's model once (`dcad.train.pipeline.train_drdc`, the profile's config)
the first time a method needs it; the methods here are views on it:

- `drdc`            the full model (base map fused with the refinement maps);
- `drdc_base_only`  the base map alone (the profile's `base.map`: the patch memory in the shipped profiles, or the
                    UniAD-like reconstruction error): `ablation.mode=base_only` at evaluation; its training time is
                    the base stage's (the refiner is not needed for it);
- `drdc_refine_only` the refinement maps alone (`ablation.mode=refine_only`, still base-guided);
- `reverse_diffusion` the same trained denoiser run as a full reverse chain (deterministic DDIM from
                    T/2 in `steps` steps, masked regions only; the lead's `reverse_diffusion_variant`)
                    instead of one step at a few selected timesteps, then the same high-frequency
                    comparison, standardised on normal validation images; its refinement map alone.
"""

from __future__ import annotations

import copy
import math
import time
from pathlib import Path

import torch
from torch import Tensor
from torch.utils.data import Subset

from bench.measure import Measurement, measured
from bench.methods.base import FitData, MethodInfo
from bench.refiner_vs_reverse_diffusion import reverse_diffusion_variant
from dcad.core.config import Ablation, RefinementBudget
from dcad.core.errors import ModelError
from dcad.core.model.drdc import DRDC
from dcad.core.model.model_dir import load_model, read_metadata
from dcad.train.calibrate import calibrate
from dcad.train.pipeline import TrainHooks, train_drdc


class SharedDRDC:
    """One DRDC model per dataset, trained on first use (or loaded from a model directory trained on the same
    dataset); records training time and memory."""

    def __init__(self, model_dir: Path | None = None) -> None:
        self.model: DRDC | None = None
        self.model_dir = model_dir
        self.training = Measurement()
        self.base_seconds = 0.0

    def get(self, data: FitData) -> DRDC:
        if self.model is None:
            if self.model_dir is not None:
                self._load(data)
            else:
                self._train(data)
            self.model.eval()
        return self.model

    def _train(self, data: FitData) -> None:
        phases: dict[str, float] = {}
        hooks = TrainHooks(on_phase=lambda name: phases.setdefault(name, time.perf_counter()))
        with measured() as self.training:
            started = time.perf_counter()
            self.model, _ = train_drdc(data.cfg, data.splits, device=data.device, hooks=hooks)
        after_base = [t for name, t in phases.items() if name not in ("prototypes and feature cache", "base branch")]
        self.base_seconds = (min(after_base) if after_base else time.perf_counter()) - started

    def _load(self, data: FitData) -> None:
        """A model `dcad train` wrote; its training time comes from its metadata (memory and the base stage's
        time are unknown: nan)."""
        meta = read_metadata(self.model_dir)
        digest = data.splits.index.digest()
        if meta.get("dataset_digest") != digest:
            raise ModelError(f"{self.model_dir}: trained on dataset {str(meta.get('dataset_digest'))[:12]}…, "
                             f"not on this benchmark's data ({digest[:12]}…)")
        self.model = load_model(self.model_dir, data.device)
        self.training = Measurement(float(meta.get("train_seconds", math.nan)), math.nan)
        self.base_seconds = math.nan


def ablation_view(model: DRDC, mode: str) -> DRDC:
    """The same trained modules, evaluated with `ablation.mode=mode` (a shallow copy; nothing is retrained)."""
    view = copy.copy(model)
    view.cfg = model.cfg.model_copy(update={"ablation": Ablation(mode=mode)})
    return view


def budget_view(model: DRDC, budget: dict, data: FitData, batch_size: int) -> DRDC:
    """The same trained modules under another `refiner.budget`, with their own calibration fitted on the
    validation split (refinement statistics and thresholds depend on which pixels are refined)."""
    view = copy.deepcopy(model)  # its calibration is re-fitted: the shared model's must stay as it is
    view.cfg.refiner.budget = RefinementBudget(**budget)
    calibrate(view, data.val, batch_size, data.device)
    return view


def unet_passes(cfg, timesteps: int, steps: int) -> int:
    """UNet evaluations per image: timesteps × scales × groups × steps (× 2 with classifier-free guidance)."""
    guided = 2 if cfg.class_conditioning and cfg.guidance_scale != 1.0 else 1
    return timesteps * len(cfg.patch_sizes) * cfg.groups * steps * guided


REFINE_ALL: dict = {}  # refine every pixel of every image
BUDGET_CURVE = {  # refiner.budget of each point of the curve (besides the profile's own and refine-all)
    "drdc_windows2": {"windows": 2, "window_size": 48},
    "drdc_window64": {"windows": 1, "window_size": 64},
    "drdc_cascade": {"windows": 1, "window_size": 48, "skip_quantile": 0.5},
}


class DRDCMethod:
    """DRDC with `ablation.mode` = full | base_only | refine_only, under the profile's refinement budget or
    another one (`budget`, a `refiner.budget` mapping; re-calibrated on validation)."""

    batch_size = 16
    _INFO = {
        "full": MethodInfo("DRDC: base map (the profile's base.map) fused with one-step diffusion inpainting refinement",
                           True),
        "base_only": MethodInfo("DRDC base map only (patch memory or feature reconstruction, per base.map)", True,
                                note="same model as drdc, evaluated with ablation.mode=base_only"),
        "refine_only": MethodInfo("DRDC refinement maps alone, every pixel refined (the base map still guides the "
                                  "denoiser)", True, note="same model as drdc, ablation.mode=refine_only, "
                                  "refiner.budget off"),
    }

    def __init__(self, shared: SharedDRDC, mode: str = "full", budget: dict | None = None, name: str | None = None,
                 info: MethodInfo | None = None) -> None:
        self.shared, self.mode, self.budget = shared, mode, budget
        self.name = name or ("drdc" if mode == "full" else f"drdc_{mode}")
        self.info = info or self._INFO[mode]
        self.training: Measurement | None = None
        self.refined = torch.zeros(4)  # refined pixels, all pixels, refined images, images

    def fit(self, data: FitData) -> None:
        model = self.shared.get(data)
        self.batch_size = data.cfg.train.eval_batch_size
        if self.budget is not None and self.mode != "base_only":
            model = budget_view(model, self.budget, data, self.batch_size)
        self.view = ablation_view(model, self.mode)
        seconds = self.shared.base_seconds if self.mode == "base_only" else self.shared.training.seconds
        self.training = Measurement(seconds, self.shared.training.peak_rss_delta_mb)
        refiner = self.view.cfg.refiner
        self.unet_passes = 0 if self.mode == "base_only" else unet_passes(refiner, len(refiner.timesteps), refiner.ddim_steps)

    @torch.no_grad()
    def predict(self, images: Tensor, categories: list[str]) -> tuple[Tensor, Tensor]:
        pred = self.view(images, self.view.category_indices(categories))
        if pred.refine_maps is not None:
            refined = pred.refine_maps.isfinite()
            self.refined += torch.tensor([refined.sum(), refined.numel(), refined.flatten(1).any(1).sum(),
                                          len(refined)]).float()
        return pred.image_score, pred.anomaly_map[:, 0]

    def refined_fractions(self) -> tuple[float, float]:
        """(share of pixels, share of images) the refinement saw among those predicted since `fit`."""
        if self.mode == "base_only":
            return 0.0, 0.0
        pixels, total, refined_images, images = self.refined.tolist()
        return pixels / max(total, 1.0), refined_images / max(images, 1.0)


def budget_methods(shared: SharedDRDC) -> dict:
    """The always-refine model and the budget-curve points, as method factories."""
    def curve_info(budget: dict) -> MethodInfo:
        shown = ", ".join(f"{k}={v}" for k, v in budget.items())
        return MethodInfo(f"DRDC, refiner.budget {shown}", True, note="same model as drdc, re-calibrated",
                          budget_curve=True)

    factories = {"drdc_refine_all": lambda: DRDCMethod(
        shared, "full", REFINE_ALL, "drdc_refine_all",
        MethodInfo("DRDC refining every pixel of every image (refiner.budget off)", True,
                   note="same model as drdc, re-calibrated"))}
    for name, budget in BUDGET_CURVE.items():
        factories[name] = lambda name=name, budget=budget: DRDCMethod(shared, "full", budget, name, curve_info(budget))
    return factories


class ReverseDiffusion:
    """The trained DRDC denoiser run as a full deterministic reverse chain from T/2 (masked inpainting).

    Built by `bench.refiner_vs_reverse_diffusion.reverse_diffusion_variant` (the same model with
    `refiner.timesteps=[T/2]`, `ddim_steps=steps`, refinement statistics re-fitted) and scored on its
    refinement maps alone (`ablation.mode=refine_only`): the classic reconstruction-based detector.
    """

    name = "reverse_diffusion"
    batch_size = 16

    def __init__(self, shared: SharedDRDC, steps: int = 50, max_test_images: int | None = None) -> None:
        self.shared, self.steps, self.max_test_images = shared, steps, max_test_images
        subset = f"; evaluated on ≤ {max_test_images} test images (plus the figure's)" if max_test_images else ""
        self.info = MethodInfo(f"full reverse diffusion with DRDC's denoiser: DDIM from T/2 in {steps} steps, "
                               "same high-frequency comparison, refinement map alone", True,
                               note="same denoiser as drdc" + subset)
        self.training: Measurement | None = None

    def fit(self, data: FitData) -> None:
        model = self.shared.get(data)
        if not model.uses_refiner:
            raise ModelError("reverse_diffusion needs the refiner (refiner.enabled=true, ablation.mode≠base_only)")
        cfg = model.cfg.refiner
        start = cfg.scheduler.num_train_timesteps // 2
        normal = [i for i, label in enumerate(data.val.labels) if label == 0][: self.max_test_images or None]
        with measured() as own:  # statistics from (at most max_test_images) normal validation images
            variant = reverse_diffusion_variant(model, Subset(data.val, normal), start, self.steps, self.batch_size)
        self.view = ablation_view(variant, "refine_only")
        self.unet_passes = unet_passes(self.view.cfg.refiner, 1, self.steps)
        self.training = Measurement(self.shared.training.seconds + own.seconds,
                                    max(self.shared.training.peak_rss_delta_mb, own.peak_rss_delta_mb))

    @torch.no_grad()
    def predict(self, images: Tensor, categories: list[str]) -> tuple[Tensor, Tensor]:
        pred = self.view(images, self.view.category_indices(categories))
        return pred.image_score, pred.anomaly_map[:, 0]
