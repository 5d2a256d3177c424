"""Spatio-temporal fusion of the refinement maps with the base map, and the image score.

Refinement maps r(τ, s) are standardised with statistics of *normal* validation images
(`RefinementStats`), averaged with weights w(τ, s), and combined with the standardised base map:

- ``sum``:     λ·base + (1−λ)·R
- ``product``: softplus(base)^λ · softplus(R)^(1−λ)   (a weighted geometric mean of positive parts:
               high only where both branches agree)
- ``gated``:   λ·base + (1−λ)·R·σ((base − k)/T)       (the refinement counts where the base already
               suspects a defect; elsewhere the coarse but category-robust base decides). This keeps the
               refinement's sharp response to thin, high-contrast defects inside a suspicious region and
               stops its texture noise from creating false positives on normal areas and stains.

then a Gaussian blur. The image score is the max of the average-pooled final map (UniAD).
"""

from __future__ import annotations

import math
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dcad.core.config import ConfigError, FusionConfig
from dcad.core.errors import ModelError


def gaussian_blur(x: Tensor, sigma: float) -> Tensor:
    """Gaussian blur over the last two dims (any leading dims); kernel 2⌈3σ⌉+1, reflect padding.

    Separable (a row pass, then a column pass): the same result as torchvision's 2-D kernel
    (`torchvision.transforms.functional.gaussian_blur`) at 2k instead of k² multiply-adds per pixel."""
    if sigma <= 0:
        return x
    h, w = x.shape[-2:]
    radius = min(math.ceil(3.0 * sigma), h - 1, w - 1)  # reflect padding needs radius < size
    if radius < 1:
        return x
    taps = torch.arange(-radius, radius + 1, device=x.device, dtype=torch.float32)
    kernel = torch.exp(-0.5 * (taps / sigma) ** 2)
    kernel = (kernel / kernel.sum()).to(x.dtype)
    flat = F.pad(x.reshape(-1, 1, h, w), [radius] * 4, mode="reflect")
    flat = F.conv2d(flat, kernel.reshape(1, 1, 1, -1))
    flat = F.conv2d(flat, kernel.reshape(1, 1, -1, 1))
    return flat.reshape(x.shape)


def image_score(anomaly_map: Tensor, pool_kernel: int) -> Tensor:
    """Max of the average-pooled map (stride 1); the kernel is clipped to the map size. [B,(1,)H,W] → [B].

    The k×k box filter runs as a column pass and a row pass (2k instead of k² additions per pixel)."""
    maps = anomaly_map if anomaly_map.dim() == 4 else anomaly_map.unsqueeze(1)
    k = max(1, min(pool_kernel, *maps.shape[-2:]))
    pooled = F.avg_pool2d(F.avg_pool2d(maps, kernel_size=(k, 1), stride=1), kernel_size=(1, k), stride=1)
    return pooled.flatten(1).amax(dim=1)


# ---- standardisation ------------------------------------------------------------------------------


class RefinementStats(nn.Module):
    """Mean/std of each refinement map r(τ, s), fitted on normal validation images.

    ``mode="scalar"`` (default): one mean/std per map (and category). ``mode="pixel"``: a mean and std
    per position, smoothed by a Gaussian (``smooth_sigma`` px, pooling neighbouring pixels) and stored
    at 1/``stride`` resolution, with the std floored at ``min_std_ratio`` × the map's global std.

    Use ``pixel`` with tens of aligned normal images per category (docs/design.md §6 says why).

    Statistics are kept per category (``num_categories`` rows, filled when `fit` receives ``(maps, categories)``
    items), plus one pooled row used for unknown categories and categories without validation images (and for
    every image when none are given). Buffers are sized here, from the arguments: ``map_size`` is the side of
    the (square) maps that ``pixel`` statistics describe.
    """

    def __init__(
        self,
        num_timesteps: int,
        num_scales: int,
        num_categories: int = 1,
        mode: str = "scalar",
        map_size: int = 1,
        smooth_sigma: float = 4.0,
        stride: int = 2,
        min_std_ratio: float = 0.1,
    ) -> None:
        super().__init__()
        if mode not in ("pixel", "scalar"):
            raise ConfigError(f"fusion.stats: unknown mode '{mode}' (pixel or scalar)")
        self.num_timesteps, self.num_scales, self.num_categories = num_timesteps, num_scales, num_categories
        self.mode, self.smooth_sigma, self.stride, self.min_std_ratio = mode, smooth_sigma, stride, min_std_ratio
        side = 1 if mode == "scalar" else math.ceil(map_size / stride)
        shape = (num_categories + 1, num_timesteps, num_scales, side, side)
        self.register_buffer("mean", torch.zeros(shape))
        self.register_buffer("std", torch.ones(shape))
        self.register_buffer("count", torch.zeros(num_categories + 1))
        self.register_buffer("fitted", torch.tensor(False))

    @classmethod
    def from_config(cls, num_timesteps: int, num_scales: int, num_categories: int, map_size: int,
                    cfg: FusionConfig) -> "RefinementStats":
        return cls(num_timesteps, num_scales, num_categories, mode=cfg.stats, map_size=map_size)

    @property
    def is_fitted(self) -> bool:
        return bool(self.fitted)

    # -- fitting --
    @torch.no_grad()
    def fit(self, maps_iter: Iterable[Tensor | tuple[Tensor, Tensor]]) -> "RefinementStats":
        """Items: refinement maps [B,T,S,H,W], or (maps, category_index [B]) for per-category rows.

        NaN marks pixels the refinement budget skipped: they are left out of the moments."""
        acc = _MomentAccumulator(self.num_categories)
        for item in maps_iter:
            maps, cats = item if isinstance(item, (tuple, list)) else (item, None)
            self._check_maps(maps)
            acc.add(maps, cats)
        if acc.total == 0:
            raise ModelError("refinement statistics: no normal validation images to fit on")
        if not acc.any_refined:
            raise ModelError("refinement statistics: the refinement budget skipped every normal validation image "
                             "(lower refiner.budget.skip_quantile)")
        mean, std, count = self._finalise(*acc.moments())
        self._set(mean, std, count)
        return self

    def _finalise(self, s1: Tensor, s2: Tensor, count: Tensor, pixels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        n = pixels.clamp_min(1)
        mean_p, m2_p = s1 / n, s2 / n
        total = pixels.sum(dim=(-2, -1), keepdim=True).clamp_min(1)
        g_mean = s1.sum(dim=(-2, -1), keepdim=True) / total
        g_std = (s2.sum(dim=(-2, -1), keepdim=True) / total - g_mean**2).clamp_min(0).sqrt().clamp_min(1e-6)
        if self.mode == "scalar":
            mean, std = g_mean, g_std
        else:
            mean = gaussian_blur(mean_p, self.smooth_sigma)
            var = (gaussian_blur(m2_p, self.smooth_sigma) - mean**2).clamp_min(0)
            std = torch.maximum(var.sqrt(), self.min_std_ratio * g_std)
            if self.stride > 1:
                mean, std = (F.avg_pool2d(v.flatten(0, 2), self.stride, ceil_mode=True) for v in (mean, std))
                mean, std = (v.reshape(*s1.shape[:3], *v.shape[-2:]) for v in (mean, std))
        pooled = mean.shape[0] - 1
        empty = pixels.flatten(1).sum(1) == 0  # categories without (refined) validation images: the pooled row
        mean[empty], std[empty] = mean[pooled].clone(), std[pooled].clone()
        return mean.float(), std.float(), count.float()

    def _set(self, mean: Tensor, std: Tensor, count: Tensor) -> None:
        if mean.shape != self.mean.shape:
            raise ModelError(f"refinement statistics of shape {list(mean.shape)} do not fit buffers sized "
                             f"{list(self.mean.shape)} (categories + pooled, timesteps, scales, map rows, map columns)")
        self.mean.copy_(mean)
        self.std.copy_(std)
        self.count.copy_(count)
        self.fitted.fill_(True)

    # -- use --
    def standardise(self, maps: Tensor, category_index: Tensor | None = None) -> Tensor:
        """(maps − mean)/std, per category when known (index outside the fitted rows → pooled row); pixels the
        refinement budget skipped (NaN) get 0, the mean of normal images."""
        if not self.is_fitted:
            raise ModelError("refinement statistics are not fitted: calibrate the model on validation images first")
        self._check_maps(maps)
        rows = self._rows(category_index, maps.shape[0], maps.device)
        mean, std = self.mean[rows], self.std[rows]
        if mean.shape[-2:] != maps.shape[-2:] and mean.shape[-2:] != (1, 1):
            mean, std = (_resize(v, maps.shape[-2:]) for v in (mean, std))
        return ((maps - mean) / std).nan_to_num(nan=0.0)

    def _rows(self, category_index: Tensor | None, batch: int, device: torch.device) -> Tensor:
        pooled = self.mean.shape[0] - 1
        if category_index is None:
            return torch.full((batch,), pooled, dtype=torch.long, device=device)
        idx = category_index.to(device=device, dtype=torch.long)
        return torch.where((idx >= 0) & (idx < pooled), idx, torch.full_like(idx, pooled))

    def _check_maps(self, maps: Tensor) -> None:
        if maps.dim() != 5 or tuple(maps.shape[1:3]) != (self.num_timesteps, self.num_scales):
            raise ModelError(
                f"refinement maps must be [B,{self.num_timesteps},{self.num_scales},H,W] "
                f"(timesteps × scales), got {list(maps.shape)}"
            )


class _MomentAccumulator:
    """Per-category (+ pooled last row) pixelwise sums of r and r² and counts of finite r, in float64."""

    def __init__(self, num_categories: int) -> None:
        self.s1: dict[int, Tensor] = {}
        self.s2: dict[int, Tensor] = {}
        self.pixels: dict[int, Tensor] = {}
        self.n: dict[int, int] = {}
        self.total = 0
        self.num_categories = num_categories

    @property
    def any_refined(self) -> bool:
        return bool(self.pixels[-1].sum() > 0)

    def _add_row(self, key: int, maps: Tensor) -> None:
        finite = torch.isfinite(maps)
        m = torch.where(finite, maps.double(), 0.0)
        if key not in self.s1:
            self.s1[key], self.s2[key], self.n[key] = torch.zeros_like(m[0]), torch.zeros_like(m[0]), 0
            self.pixels[key] = torch.zeros_like(m[0])
        self.s1[key] += m.sum(0)
        self.s2[key] += (m * m).sum(0)
        self.pixels[key] += finite.sum(0)
        self.n[key] += m.shape[0]

    def add(self, maps: Tensor, cats: Tensor | None) -> None:
        if self.s1 and next(iter(self.s1.values())).shape != maps.shape[1:]:
            raise ModelError(f"refinement maps change size during fit: {list(maps.shape[1:])}")
        self._add_row(-1, maps)
        self.total += maps.shape[0]
        if cats is None:
            return
        cats = cats.to(maps.device).long()
        for c in cats.unique().tolist():
            if c >= self.num_categories:
                raise ModelError(f"refinement statistics: category index {c} but {self.num_categories} categories")
            if c >= 0:
                self._add_row(c, maps[cats == c])

    def moments(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        keys = list(range(self.num_categories)) + [-1]  # categories 0..K-1, then pooled
        like = self.s1[-1]
        s1 = torch.stack([self.s1.get(k, torch.zeros_like(like)) for k in keys])
        s2 = torch.stack([self.s2.get(k, torch.zeros_like(like)) for k in keys])
        pixels = torch.stack([self.pixels.get(k, torch.zeros_like(like)) for k in keys])
        count = torch.tensor([self.n.get(k, 0) for k in keys], dtype=torch.float64, device=like.device)
        return s1, s2, count, pixels


def _resize(stats: Tensor, size: tuple[int, int]) -> Tensor:
    b, t, s = stats.shape[:3]
    out = F.interpolate(stats.flatten(0, 2).unsqueeze(1), size=size, mode="bilinear", align_corners=False)
    return out.reshape(b, t, s, *size)


# ---- fusion -----------------------------------------------------------------------------------------


def fusion_weights(weights: dict[str, float] | None, timesteps: list[int], patch_sizes: list[int]) -> Tensor:
    """w(τ, s) as a [T, S] tensor summing to 1; uniform when `weights` is empty, missing keys count 0."""
    keys = [[f"t{t}_s{s}" for s in patch_sizes] for t in timesteps]
    if not weights:
        return torch.full((len(timesteps), len(patch_sizes)), 1.0 / (len(timesteps) * len(patch_sizes)))
    known = {k for row in keys for k in row}
    unknown = sorted(set(weights) - known)
    if unknown:
        raise ConfigError(f"fusion.weights: unknown key(s) {unknown}; expected some of {sorted(known)}")
    w = torch.tensor([[float(weights.get(k, 0.0)) for k in row] for row in keys])
    if (w < 0).any() or w.sum() <= 0:
        raise ConfigError("fusion.weights: weights must be ≥ 0 with a positive sum")
    return w / w.sum()


def fuse_refinement(refine_z: Tensor, weights: Tensor) -> Tensor:
    """Σ w(τ,s)·r_z(τ,s): [B,T,S,H,W] → [B,1,H,W]."""
    w = weights.to(device=refine_z.device, dtype=refine_z.dtype)
    return torch.einsum("btshw,ts->bhw", refine_z, w).unsqueeze(1)


def combine(base_z: Tensor, refine: Tensor, cfg: FusionConfig) -> Tensor:
    """Base and fused refinement map (both standardised) → one map, per `cfg.mode`."""
    lam = cfg.base_weight
    if cfg.mode == "sum":
        return lam * base_z + (1.0 - lam) * refine
    if cfg.mode == "product":
        return F.softplus(base_z).pow(lam) * F.softplus(refine).pow(1.0 - lam)
    if cfg.mode == "gated":
        gate = torch.sigmoid((base_z - cfg.gate_offset) / cfg.gate_temperature)
        return lam * base_z + (1.0 - lam) * refine * gate
    raise ConfigError(f"fusion.mode: unknown mode '{cfg.mode}'")


def fuse(
    base_z: Tensor,
    refine_z: Tensor,
    cfg: FusionConfig,
    timesteps: list[int],
    patch_sizes: list[int],
    *,
    refine_only: bool = False,
    base_only: bool = False,
) -> Tensor:
    """Final anomaly map [B,1,H,W] from the standardised base map and refinement maps, then blurred."""
    if refine_z.shape[1:3] != (len(timesteps), len(patch_sizes)):
        raise ModelError(
            f"refinement maps are {list(refine_z.shape)}, expected [B,{len(timesteps)},{len(patch_sizes)},H,W]"
        )
    if base_only:
        return gaussian_blur(base_z, cfg.blur_sigma)
    refine = fuse_refinement(refine_z, fusion_weights(cfg.weights, timesteps, patch_sizes))
    final = refine if refine_only else combine(base_z, refine, cfg)
    return gaussian_blur(final, cfg.blur_sigma)
