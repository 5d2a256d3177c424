"""DRDC: the composite multi-class model (backbone → base branch → diffusion refinement → fusion).

`DRDC.forward(images, category_index=None)` returns the base map, the refinement maps, the fused
anomaly map and the image score. Normalisation statistics and thresholds live in `Calibration`
(buffers fitted on the validation split of normal training images, never on test).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from dcad.core.config import ConfigError, DCADConfig, FusionConfig
from dcad.core.errors import ModelError
from dcad.core.model.backbone import FeatureExtractor
from dcad.core.model.base_branch import BaseReconstructor
from dcad.core.model.denoiser import Denoiser
from dcad.core.model.fusion import RefinementStats, fuse, gaussian_blur, image_score
from dcad.core.model.inpainting import InpaintingRefiner, fixed_noise
from dcad.core.model.memory_bank import PatchMemory
from dcad.core.model.noise import build_scheduler
from dcad.core.model.windows import crop_windows, paste_windows, peak_windows


@dataclass
class Prediction:
    base_map: Tensor  # [B,1,H,W] raw base map (feature reconstruction error, or patch-memory distance)
    refine_maps: Tensor | None  # [B,T,S,H,W] raw refinement maps, or None (base only)
    anomaly_map: Tensor  # [B,1,H,W] final map (standardised units)
    image_score: Tensor  # [B]
    category_index: Tensor  # [B] given or predicted


class Calibration(nn.Module):
    """Statistics fitted on validation data: map standardisation, thresholds, score range.

    The thresholds are not part of the state dict: the model directory keeps them in its metadata."""

    THRESHOLDS = ("image_threshold", "pixel_threshold")

    def __init__(self, num_timesteps: int, num_scales: int, num_categories: int, map_size: int,
                 fusion: FusionConfig) -> None:
        super().__init__()
        self.register_buffer("base_mean", torch.zeros(()))
        self.register_buffer("base_std", torch.ones(()))
        self.refine = RefinementStats.from_config(num_timesteps, num_scales, num_categories, map_size, fusion)
        for name in self.THRESHOLDS:
            self.register_buffer(name, torch.tensor(float("nan")), persistent=False)
        self.register_buffer("image_min", torch.tensor(float("nan")))
        self.register_buffer("image_max", torch.tensor(float("nan")))
        # Cascade (refiner.budget.skip_quantile): images whose base score is below this are not refined.
        self.register_buffer("refine_skip_score", torch.tensor(float("-inf")))

    def standardise_base(self, base_map: Tensor) -> Tensor:
        return (base_map - self.base_mean) / self.base_std.clamp_min(1e-8)

    @property
    def is_fitted(self) -> bool:
        return bool(torch.isfinite(self.image_threshold))

    def normalise_scores(self, scores: Tensor) -> Tensor:
        """anomalib-style: threshold ↦ 0.5, clamp to [0, 1]."""
        span = (self.image_max - self.image_min).clamp_min(1e-8)
        return ((scores - self.image_threshold) / span + 0.5).clamp(0.0, 1.0)


class DRDC(nn.Module):
    def __init__(self, cfg: DCADConfig, categories: list[str]) -> None:
        super().__init__()
        if not categories:
            raise ValueError("DRDC needs at least one category")
        if cfg.refiner.budget.windows and cfg.fusion.stats == "pixel":
            raise ConfigError("refiner.budget.windows needs fusion.stats=scalar (per-pixel statistics need every pixel "
                              "refined)")
        self.cfg = cfg
        self.categories = list(categories)
        self.backbone = FeatureExtractor(cfg.backbone, cfg.data.image_size)
        # The base map's module: the reconstruction transformer, or the patch memory (the other one is None).
        self.base: BaseReconstructor | None = None
        self.memory: PatchMemory | None = None
        if cfg.base.map == "memory":
            self.memory = PatchMemory(cfg.base.memory, sum(self.backbone.stage_channels), cfg.data.image_size, cfg.train.seed)
        else:
            self.base = BaseReconstructor(self.backbone.channels, self.backbone.grid, cfg.base, self.backbone.stage_channels)
        self.denoiser = Denoiser(cfg.refiner, len(categories)) if cfg.uses_refiner else None
        self.scheduler = build_scheduler(cfg.refiner.scheduler) if cfg.uses_refiner else None
        self.register_buffer("prototypes", torch.zeros(len(categories), self.backbone.channels))
        self.calibration = Calibration(len(cfg.refiner.timesteps), len(cfg.refiner.patch_sizes), len(categories),
                                       cfg.data.image_size, cfg.fusion)

    # ---- pieces ------------------------------------------------------------------------------
    @property
    def uses_refiner(self) -> bool:
        """Whether this model has a denoiser and its config (e.g. `ablation.mode`) uses it."""
        return self.denoiser is not None and self.cfg.uses_refiner

    @property
    def image_size(self) -> int:
        return self.cfg.data.image_size

    def category_indices(self, names: list[str]) -> Tensor:
        lookup = {c: i for i, c in enumerate(self.categories)}
        return torch.tensor([lookup[n] for n in names], dtype=torch.long)

    @torch.no_grad()
    def predict_category(self, images: Tensor, feats: Tensor | None = None) -> Tensor:
        """Nearest per-category prototype (cosine) of the backbone's pooled features."""
        pooled = feats.mean(dim=(2, 3)) if feats is not None else self.backbone.pooled(images)
        sims = nn.functional.normalize(pooled, dim=1) @ nn.functional.normalize(self.prototypes, dim=1).T
        return sims.argmax(dim=1)

    def refiner(self) -> InpaintingRefiner:
        assert self.denoiser is not None
        return InpaintingRefiner(self.denoiser, self.cfg.refiner, self.scheduler)

    def class_labels(self, category_index: Tensor) -> Tensor:
        if self.denoiser is None or not self.cfg.refiner.class_conditioning:
            return torch.full_like(category_index, self.denoiser.null_class if self.denoiser else 0)
        return category_index

    # ---- inference ---------------------------------------------------------------------------
    @torch.no_grad()
    def raw_maps(self, images: Tensor, category_index: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor | None, Tensor]:
        """(base map, standardised base map, raw refinement maps or None, category index)."""
        feats, stages = self.backbone.extract(images)
        if category_index is None:
            category_index = self.predict_category(images, feats)
        category_index = category_index.to(images.device)
        base_map = self.base_map(images, feats, category_index, stages)
        base_z = self.calibration.standardise_base(base_map)
        refine_maps = self.refinement(images, base_z, category_index) if self.uses_refiner else None
        return base_map, base_z, refine_maps, category_index

    @torch.no_grad()
    def base_map(self, images: Tensor, feats: Tensor, category_index: Tensor, stages: list[Tensor] | None = None) -> Tensor:
        """[B,1,H,W] raw base map under `base.map`: the transformer's reconstruction error of the backbone features
        `feats`, or the patch memory's nearest-neighbour distances of the backbone `stages` (computed when None)."""
        if self.memory is None:
            return self.base.anomaly_map(feats, self.base(feats), self.image_size)
        if stages is None:
            stages = self.backbone.stages(images)
        distances = self.memory.distance_map(self.memory.features(stages), category_index)
        return nn.functional.interpolate(distances, size=images.shape[-2:], mode="bilinear", align_corners=False)

    def base_scores(self, base_z: Tensor) -> Tensor:
        """Image scores [B] of the base branch alone (what `ablation.mode=base_only` reports)."""
        return image_score(gaussian_blur(base_z, self.cfg.fusion.blur_sigma), self.cfg.fusion.pool_kernel)

    @torch.no_grad()
    def refinement(self, images: Tensor, base_z: Tensor, category_index: Tensor) -> Tensor:
        """Raw refinement maps [B,T,S,H,W] within `refiner.budget`; NaN where a pixel was not refined."""
        refiner, budget = self.refiner(), self.cfg.refiner.budget
        if not budget.adaptive:
            return self._refine(images, base_z, category_index, refiner)
        b, _, h, w = images.shape
        cfg = self.cfg.refiner
        out = images.new_full((b, len(cfg.timesteps), len(cfg.patch_sizes), h, w), float("nan"))
        chosen = torch.arange(b, device=images.device)
        if budget.skip_quantile > 0:
            chosen = (self.base_scores(base_z) >= self.calibration.refine_skip_score).nonzero()[:, 0]
        if len(chosen) == 0:
            return out
        images, base_z, category_index = images[chosen], base_z[chosen], category_index[chosen]
        if budget.windows == 0:
            out[chosen] = self._refine(images, base_z, category_index, refiner)
            return out
        size = budget.window_size
        corners = peak_windows(base_z, budget.windows, size, self.window_align)
        noise = fixed_noise(cfg.seed, h, w, images.device, torch.float32).expand(len(chosen), 3, h, w)
        maps = self._refine(crop_windows(images, corners, size), crop_windows(base_z, corners, size),
                            category_index.repeat_interleave(budget.windows), refiner,
                            noise=crop_windows(noise, corners, size), area_ratio=h * w / size**2)
        out[chosen] = paste_windows(maps, corners, h, w)
        return out

    @property
    def window_align(self) -> int:
        """Windows start on multiples of this, so their inpainting cells are the whole image's cells."""
        return math.lcm(max(self.cfg.refiner.patch_sizes), self.denoiser.size_multiple)

    def _refine(self, images: Tensor, base_z: Tensor, category_index: Tensor, refiner: InpaintingRefiner,
                noise: Tensor | None = None, area_ratio: float = 1.0) -> Tensor:
        guidance = base_z if self.cfg.refiner.base_map_channel else None
        inpainted = refiner.inpaint(images, guidance, self.class_labels(category_index), noise, area_ratio)
        return self.compare(images, inpainted, refiner)

    @torch.no_grad()
    def compare(self, images: Tensor, inpainted: Tensor, refiner: InpaintingRefiner) -> Tensor:
        """Refinement maps [B,T,S,H,W] of images [B,3,H,W] against their inpaintings [B,T,S,3,H,W]."""
        if self.cfg.refiner.compare == "pixels":
            return refiner.refinement_maps(images, inpainted)
        count = self.cfg.refiner.compare_stages
        if count > len(self.backbone.stage_channels):
            raise ModelError(f"refiner.compare_stages={count}: the backbone has {len(self.backbone.stage_channels)} "
                             f"stages (backbone.out_indices)")
        b, t, s = inpainted.shape[:3]
        real = self.backbone.stages(images, count)
        fake = self.backbone.stages(inpainted.flatten(0, 2), count)
        size = images.shape[-2:]
        maps = []
        for f_real, f_fake in zip(real, fake):
            f_real = f_real.unsqueeze(1).unsqueeze(1).expand(b, t, s, *f_real.shape[1:]).flatten(0, 2)
            err = 1.0 - nn.functional.cosine_similarity(f_real, f_fake, dim=1, eps=1e-6).unsqueeze(1)
            maps.append(nn.functional.interpolate(err, size=size, mode="bilinear", align_corners=False))
        return torch.stack(maps).mean(dim=0).reshape(b, t, s, *size)

    @torch.no_grad()
    def forward(self, images: Tensor, category_index: Tensor | None = None) -> Prediction:
        base_map, base_z, refine_maps, category_index = self.raw_maps(images, category_index)
        final, scores = self.score_maps(base_z, refine_maps, category_index)
        return Prediction(base_map, refine_maps, final, scores, category_index)

    @torch.no_grad()
    def score_maps(self, base_z: Tensor, refine_maps: Tensor | None, category_index: Tensor,
                   mode: str | None = None) -> tuple[Tensor, Tensor]:
        """(final map, image scores) from the standardised base map and the raw refinement maps.

        `mode` ("full", "refine_only"; default the config's `ablation.mode`) re-scores maps already computed,
        so an ablation needs no second pass through the denoiser."""
        mode = mode or self.cfg.ablation.mode
        if refine_maps is None or mode == "base_only":
            final = gaussian_blur(base_z, self.cfg.fusion.blur_sigma)
            return final, image_score(final, self.cfg.fusion.pool_kernel)
        refine_z = self.calibration.refine.standardise(refine_maps, category_index)
        final = fuse(base_z, refine_z, self.cfg.fusion, self.cfg.refiner.timesteps, self.cfg.refiner.patch_sizes,
                     refine_only=mode == "refine_only")
        if mode == "full" and self.cfg.fusion.image_map == "base":
            return final, self.base_scores(base_z)
        return final, image_score(final, self.cfg.fusion.pool_kernel)


# Config keys that change only how a trained model scores images (not its weights or statistics).
INFERENCE_KEYS = (
    "ablation.",
    "fusion.mode",
    "fusion.base_weight",
    "fusion.weights",
    "fusion.blur_sigma",
    "fusion.pool_kernel",
    "fusion.image_map",
    "fusion.gate_offset",
    "fusion.gate_temperature",
    "refiner.guidance_scale",
    "refiner.ddim_steps",
    "refiner.max_batch",
    "refiner.precision",
    "train.eval_batch_size",
)


def with_inference_overrides(model: DRDC, overrides: list[str] | None) -> DRDC:
    """Apply `key=value` overrides that only change inference (ablation mode, fusion, guidance) in place.

    A key outside `INFERENCE_KEYS` would need retraining and raises `ConfigError` naming it.
    `ablation.mode=base_only` on a model with a denoiser simply skips the refinement branch;
    `refine_only`/`full` need a model trained with a denoiser.
    """
    if not overrides:
        return model
    from dcad.core.config import ConfigError, apply_overrides, parse_override

    pairs = [parse_override(item) for item in overrides]
    for key, _ in pairs:
        if not any(key == k or (k.endswith(".") and key.startswith(k)) for k in INFERENCE_KEYS):
            raise ConfigError(f"--set {key}: changes the trained model; only inference keys may change here "
                              f"({', '.join(INFERENCE_KEYS)})")
    data = apply_overrides(model.cfg.model_dump(mode="json"), dict(pairs))
    cfg = DCADConfig.from_dict(data, "--set")
    if cfg.ablation.mode != "base_only" and model.denoiser is None:
        raise ConfigError(f"--set ablation.mode={cfg.ablation.mode}: this model was trained without a refiner")
    model.cfg = cfg
    return model
