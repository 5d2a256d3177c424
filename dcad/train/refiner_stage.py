"""Training stage of the refinement branch: conditional diffusion inpainting on random crops.

Per sample: a random crop (``cfg.crop_size``) of a normal training image and the same crop of its
standardised base map; a random scale s and one random group of that scale's masks (cells laid on the
crop grid); t ~ U[1, t_max); ε ~ N(0, I); x_t = √ᾱ_t·x + √(1−ᾱ_t)·ε with x in [-1, 1]. The denoiser sees
(x_t, x⊙(1−m), m, base) and the category, replaced by the null class with probability
``cfg.cond_dropout`` (for classifier-free guidance). The loss is the MSE of the prediction target
(ε, v or x0) over the masked region only, normalised by its area: the network learns to paint a region
from its surroundings, never to copy it. All randomness comes from the generator given to `loss`.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from dcad.core.config import RefinerConfig
from dcad.core.errors import DatasetError, ModelError
from dcad.core.model.denoiser import Denoiser
from dcad.core.model.inpainting import inpainting_masks
from dcad.core.model.noise import build_scheduler

ValidateFn = Callable[[nn.Module], dict[str, float]]


def to_unit_float(images: Tensor) -> Tensor:
    """uint8 [0,255] or float [0,1] images → float32 in [0,1]."""
    if images.dtype == torch.uint8:
        return images.float() / 255.0
    return images.float()


class RefinerSamples(Dataset):
    """Full training images with their base map and category; cropping happens in `loss` (seeded)."""

    def __init__(self, images: Tensor | Dataset, base_maps: Tensor | None, category_index: Tensor) -> None:
        self.images = images
        self.base_maps = base_maps
        self.category_index = category_index.long()
        n = len(images)
        if len(self.category_index) != n:
            raise DatasetError(f"refiner training: {n} images but {len(self.category_index)} category indices")
        if base_maps is not None and len(base_maps) != n:
            raise DatasetError(f"refiner training: {n} images but {len(base_maps)} base maps")

    def __len__(self) -> int:
        return len(self.images)

    def _image(self, index: int) -> Tensor:
        item = self.images[index]
        if isinstance(item, dict):
            item = item["image"]
        elif isinstance(item, (tuple, list)):
            item = item[0]
        if not isinstance(item, Tensor) or item.dim() != 3 or item.shape[0] != 3:
            shape = list(item.shape) if isinstance(item, Tensor) else type(item).__name__
            raise DatasetError(f"refiner training: sample {index} is not an image tensor [3,H,W] (got {shape})")
        return item

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        image = self._image(index)
        if self.base_maps is not None:
            base = self.base_maps[index].float()
        else:
            base = torch.zeros(1, *image.shape[-2:])
        return {"image": image, "base_map": base, "category": self.category_index[index]}


class _Draws:
    """Random draws from the loss generator, moved to the batch's device."""

    def __init__(self, generator: torch.Generator, device: torch.device) -> None:
        self.generator, self.device = generator, device

    def ints(self, low: int, high: int, n: int) -> Tensor:
        g = self.generator
        return torch.randint(low, high, (n,), generator=g, device=g.device).to(self.device)

    def uniform(self, n: int) -> Tensor:
        g = self.generator
        return torch.rand((n,), generator=g, device=g.device).to(self.device)

    def normal(self, shape: tuple[int, ...]) -> Tensor:
        g = self.generator
        return torch.randn(shape, generator=g, device=g.device).to(self.device)


class RefinerStage:
    """`TrainStage` of the denoiser (name ``"refiner"``)."""

    name = "refiner"

    def __init__(
        self,
        denoiser: Denoiser,
        scheduler: Any,
        cfg: RefinerConfig,
        images: Tensor | Dataset,
        base_maps: Tensor | None,
        category_index: Tensor,
        validate_fn: ValidateFn | None = None,
    ) -> None:
        self.denoiser = denoiser
        self.scheduler = scheduler if scheduler is not None else build_scheduler(cfg.scheduler)
        self.cfg = cfg
        self.samples = RefinerSamples(images, base_maps, category_index)
        self.validate_fn = validate_fn
        steps = self.scheduler.config.num_train_timesteps
        self.t_max = min(cfg.train_timestep_max or steps, steps)
        multiple = denoiser.size_multiple
        if cfg.crop_size % multiple:
            raise ModelError(f"refiner.crop_size={cfg.crop_size} must be a multiple of {multiple} (the UNet's size step)")
        self._masks: dict[int, Tensor] = {}

    # ---- TrainStage ---------------------------------------------------------------------------------
    def module(self) -> nn.Module:
        return self.denoiser

    def dataset(self) -> Dataset:
        return self.samples

    def validate(self, module: nn.Module) -> dict[str, float]:
        return self.validate_fn(module) if self.validate_fn is not None else {}

    def loss(self, module: nn.Module, batch: dict[str, Tensor], generator: torch.Generator) -> Tensor:
        images = to_unit_float(batch["image"])
        draws = _Draws(generator, images.device)
        x, base = self._random_crops(images, batch["base_map"].float(), draws)
        x = x * 2.0 - 1.0
        b = x.shape[0]
        mask = self._random_masks(x.shape[-1], b, draws)
        t = draws.ints(1, self.t_max, b)
        noise = draws.normal(tuple(x.shape))
        x_t = self.scheduler.add_noise(x, noise, t)
        labels = self._labels(batch["category"].to(x.device), draws)
        prediction = module(x_t, t, x * (1.0 - mask), mask, base, labels)
        return masked_mse(prediction.float(), self._target(x, noise, t), mask)

    # ---- pieces -------------------------------------------------------------------------------------
    def crop_size(self, height: int, width: int) -> int:
        """`cfg.crop_size`, or the largest allowed size that fits a smaller image."""
        multiple = self.denoiser.size_multiple
        fit = min(self.cfg.crop_size, height, width) // multiple * multiple
        if fit < multiple:
            raise DatasetError(f"refiner training: images of {height}×{width} px are smaller than the UNet step {multiple}")
        return fit

    def _random_crops(self, images: Tensor, base_maps: Tensor, draws: _Draws) -> tuple[Tensor, Tensor]:
        b, _, h, w = images.shape
        c = self.crop_size(h, w)
        ys, xs = draws.ints(0, h - c + 1, b).tolist(), draws.ints(0, w - c + 1, b).tolist()
        crop = [images[i, :, y : y + c, x : x + c] for i, (y, x) in enumerate(zip(ys, xs))]
        base = [base_maps[i, :, y : y + c, x : x + c] for i, (y, x) in enumerate(zip(ys, xs))]
        return torch.stack(crop), torch.stack(base)

    def _masks_for(self, size: int, device: torch.device) -> Tensor:
        """[S, G, 1, c, c] masks on the crop grid, cached per crop size."""
        if size not in self._masks:
            self._masks[size] = torch.stack([inpainting_masks(size, size, s, self.cfg.groups) for s in self.cfg.patch_sizes])
        self._masks[size] = self._masks[size].to(device)
        return self._masks[size]

    def _random_masks(self, size: int, batch: int, draws: _Draws) -> Tensor:
        masks = self._masks_for(size, draws.device)
        scale = draws.ints(0, masks.shape[0], batch)
        group = draws.ints(0, masks.shape[1], batch)
        return masks[scale, group]

    def _labels(self, category: Tensor, draws: _Draws) -> Tensor | None:
        if not self.cfg.class_conditioning:
            return None
        dropped = draws.uniform(category.shape[0]) < self.cfg.cond_dropout
        return torch.where(dropped, torch.full_like(category, self.denoiser.null_class), category.long())

    def _target(self, x: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        kind = self.scheduler.config.prediction_type
        if kind == "epsilon":
            return noise
        if kind == "sample":
            return x
        return self.scheduler.get_velocity(x, noise, t)


def masked_mse(prediction: Tensor, target: Tensor, mask: Tensor) -> Tensor:
    """Mean squared error over the masked pixels (all channels), normalised by the mask's area."""
    area = (mask.sum() * prediction.shape[1]).clamp_min(1.0)
    return ((prediction - target) ** 2 * mask).sum() / area
