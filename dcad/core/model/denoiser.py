"""The refinement branch's denoiser: a class-conditional inpainting UNet (diffusers `UNet2DModel`).

Input channels, stacked in this order: the noised image x_t (3), then — with test-time
conditioning — the visible context x⊙(1−m) (3) and the mask m (1), then — with the base-map
channel — the standardised base map (1). Images live in [-1, 1].

Class conditioning adds a category embedding to the time embedding (`num_class_embeds = K + 1`;
index K is the *null* class used for classifier-free guidance and for unknown categories).

`space_to_depth = r > 1` wraps the UNet in a lossless pixel-unshuffle stem and pixel-shuffle head:
the UNet runs at 1/r resolution on r² times the channels. On CPU this cuts the cost of the
full-resolution level (which dominates) by about r², at no loss of output resolution.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers import UNet2DModel
from torch import Tensor, nn

from dcad.core.config import RefinerConfig
from dcad.core.errors import ModelError

IMAGE_CHANNELS = 3
BASE_MAP_CLAMP = 10.0  # standardised units; bounds out-of-distribution guidance values at test time


def input_channels(cfg: RefinerConfig) -> int:
    """Channels the denoiser sees (before space-to-depth), following the conditioning switches."""
    channels = IMAGE_CHANNELS
    if cfg.test_time_conditioning:
        channels += IMAGE_CHANNELS + 1
    if cfg.base_map_channel:
        channels += 1
    return channels


def _build_unet(cfg: RefinerConfig, num_categories: int) -> UNet2DModel:
    unet = cfg.unet
    if len(unet.attention_levels) != len(unet.block_out_channels):
        raise ModelError(
            f"refiner.unet.attention_levels has {len(unet.attention_levels)} entries but "
            f"block_out_channels has {len(unet.block_out_channels)}"
        )
    bad = [c for c in unet.block_out_channels if c % unet.norm_num_groups]
    if bad:
        raise ModelError(f"refiner.unet.block_out_channels {bad} are not multiples of norm_num_groups={unet.norm_num_groups}")
    r2 = cfg.space_to_depth**2
    return UNet2DModel(
        in_channels=input_channels(cfg) * r2,
        out_channels=IMAGE_CHANNELS * r2,
        block_out_channels=tuple(unet.block_out_channels),
        layers_per_block=unet.layers_per_block,
        down_block_types=tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in unet.attention_levels),
        up_block_types=tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(unet.attention_levels)),
        add_attention=unet.attention_levels[-1],  # mid-block attention only where the deepest level has it
        norm_num_groups=unet.norm_num_groups,
        num_class_embeds=num_categories + 1 if cfg.class_conditioning else None,
    )


class Denoiser(nn.Module):
    """Conditional inpainting denoiser; predicts ε, v or x0 (per `refiner.scheduler.prediction_type`)."""

    def __init__(self, cfg: RefinerConfig, num_categories: int) -> None:
        super().__init__()
        if num_categories < 1:
            raise ModelError(f"the denoiser needs at least one category, got {num_categories}")
        self.cfg = cfg
        self.num_categories = num_categories
        self.null_class = num_categories
        self.unet = _build_unet(cfg, num_categories)

    @property
    def size_multiple(self) -> int:
        """Height and width must be multiples of this (UNet downsamplings × space-to-depth)."""
        return 2 ** (len(self.cfg.unet.block_out_channels) - 1) * self.cfg.space_to_depth

    def check_size(self, height: int, width: int) -> None:
        m = self.size_multiple
        if height % m or width % m:
            raise ModelError(
                f"refiner input {height}×{width} px: height and width must be multiples of {m} "
                f"(2^(UNet levels−1) × space_to_depth)"
            )

    def _stack_inputs(self, x_t: Tensor, context: Tensor | None, mask: Tensor | None, base_map: Tensor | None) -> Tensor:
        parts = [x_t]
        if self.cfg.test_time_conditioning:
            if context is None or mask is None:
                raise ModelError("the denoiser uses test-time conditioning: pass the context and the mask")
            parts += [context * (1.0 - mask), mask]
        if self.cfg.base_map_channel:
            if base_map is None:
                raise ModelError("the denoiser has a base-map channel (refiner.base_map_channel): pass a base map")
            parts.append(base_map.clamp(-BASE_MAP_CLAMP, BASE_MAP_CLAMP))
        return torch.cat([p.to(x_t.dtype) for p in parts], dim=1)

    def forward(
        self,
        x_t: Tensor,
        t: Tensor,
        context: Tensor | None = None,
        mask: Tensor | None = None,
        base_map: Tensor | None = None,
        class_labels: Tensor | None = None,
    ) -> Tensor:
        """x_t, context [B,3,H,W] in [-1,1]; mask, base_map [B,1,H,W]; t, class_labels [B] long."""
        self.check_size(*x_t.shape[-2:])
        h = self._stack_inputs(x_t, context, mask, base_map)
        r = self.cfg.space_to_depth
        if r > 1:
            h = F.pixel_unshuffle(h, r)
        if not self.training:
            h = h.contiguous(memory_format=torch.channels_last)  # faster CPU convolutions at inference
        labels = self._labels(class_labels, x_t.shape[0], x_t.device)
        out = self.unet(h, t, class_labels=labels).sample
        if r > 1:
            out = F.pixel_shuffle(out, r)
        return out.contiguous()

    def _labels(self, class_labels: Tensor | None, batch: int, device: torch.device) -> Tensor | None:
        if not self.cfg.class_conditioning:
            return None
        if class_labels is None:
            return torch.full((batch,), self.null_class, dtype=torch.long, device=device)
        labels = class_labels.to(device=device, dtype=torch.long)
        if labels.numel() and (labels.min() < 0 or labels.max() > self.null_class):
            raise ModelError(f"class labels must lie in [0, {self.null_class}] (index {self.null_class} is the null class)")
        return labels

    def guided(
        self,
        x_t: Tensor,
        t: Tensor,
        context: Tensor | None,
        mask: Tensor | None,
        base_map: Tensor | None,
        class_labels: Tensor | None,
        guidance_scale: float,
    ) -> Tensor:
        """Classifier-free guidance, uncond + w·(cond − uncond), in one batched UNet call."""
        if not self.cfg.class_conditioning:
            return self(x_t, t, context, mask, base_map, None)
        batch = x_t.shape[0]
        labels = self._labels(class_labels, batch, x_t.device)
        null = torch.full_like(labels, self.null_class)

        def twice(v: Tensor | None) -> Tensor | None:
            return None if v is None else torch.cat([v, v])

        t = t.expand(batch) if t.dim() else t.repeat(batch)
        out = self(twice(x_t), twice(t), twice(context), twice(mask), twice(base_map), torch.cat([labels, null]))
        cond, uncond = out[:batch], out[batch:]
        return uncond + guidance_scale * (cond - uncond)
