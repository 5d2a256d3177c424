"""The patch memory of `base.map: memory`: a base map of nearest-neighbour distances to normal training patches.

Each backbone stage is averaged over its `pool` × `pool` neighbours (local context), resized to the memory's grid
(`image_size / stride`) and concatenated, as PatchCore does. A greedy k-centre coreset of each category's training
patches is kept; an image's map is the distance of each of its patches to the nearest kept patch of its category.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dcad.core.config import ConfigError, MemoryConfig
from dcad.core.errors import ModelError

BANK_BUFFERS = ("bank", "bank_category")


def greedy_coreset(patches: Tensor, size: int, projection_dim: int = 128, seed: int = 0) -> Tensor:
    """Indices of `size` rows of `patches` [N, C]: each next row the farthest from those already chosen (distances
    in a random projection to `projection_dim` dimensions when that is smaller)."""
    if size >= len(patches):
        return torch.arange(len(patches))
    generator = torch.Generator().manual_seed(seed)
    x = patches.float()
    if 0 < projection_dim < x.shape[1]:
        x = x @ (torch.randn(x.shape[1], projection_dim, generator=generator) / math.sqrt(projection_dim)).to(x)
    norms = x.pow(2).sum(dim=1)
    chosen = torch.empty(size, dtype=torch.long)
    chosen[0] = int(torch.randint(len(x), (1,), generator=generator))
    nearest = torch.full_like(norms, float("inf"))
    for i in range(size):
        if i:
            chosen[i] = nearest.argmax()
        j = chosen[i]
        distance = torch.addmv(norms, x, x[j], alpha=-2.0).add_(norms[j])  # squared, one matrix-vector product
        torch.minimum(nearest, distance, out=nearest)
    return chosen


class PatchMemory(nn.Module):
    """Normal training patches of every category ([N, C] `bank`, its rows' categories in `bank_category`)."""

    def __init__(self, cfg: MemoryConfig, channels: int, image_size: int, seed: int = 0) -> None:
        super().__init__()
        if image_size % cfg.stride:
            raise ConfigError(f"data.image_size={image_size} is not a multiple of base.memory.stride={cfg.stride}")
        self.cfg, self.channels, self.seed = cfg, channels, seed
        self.grid = image_size // cfg.stride
        self.register_buffer("bank", torch.zeros(0, channels))
        self.register_buffer("bank_category", torch.zeros(0, dtype=torch.long))

    def features(self, stages: list[Tensor]) -> Tensor:
        """Backbone stages (each at its own stride) → [B, C, grid, grid] locally averaged patch features."""
        k, size = self.cfg.pool, (self.grid, self.grid)
        pooled = [F.avg_pool2d(f.float(), k, stride=1, padding=k // 2) if k > 1 else f.float() for f in stages]
        return torch.cat([F.interpolate(f, size=size, mode="bilinear", align_corners=False) for f in pooled], dim=1)

    @torch.no_grad()
    def add_category(self, category: int, features: Tensor) -> None:
        """Keep the coreset of one category's training patch features [N, C, h, w] (replacing any it had)."""
        patches = features.permute(0, 2, 3, 1).reshape(-1, self.channels).to(self.bank)
        size = max(1, math.ceil(self.cfg.coreset_ratio * len(patches)))
        kept = patches[greedy_coreset(patches, size, self.cfg.projection_dim, self.seed + category)]
        other = self.bank_category != category
        self.bank = torch.cat([self.bank[other], kept])
        self.bank_category = torch.cat([self.bank_category[other], torch.full((len(kept),), category).to(self.bank_category)])

    @torch.no_grad()
    def distance_map(self, features: Tensor, category_index: Tensor) -> Tensor:
        """[B, 1, h, w]: each patch's distance to the nearest kept patch of its image's category."""
        b, c, h, w = features.shape
        queries = features.permute(0, 2, 3, 1).reshape(b, h * w, c).float()
        out = queries.new_empty(b, h * w)
        for category in category_index.unique().tolist():
            rows = self.bank[self.bank_category == category]
            if len(rows) == 0:
                raise ModelError(f"the patch memory holds no patch of category {category}: fit it on that category's "
                                 "training images")
            for i in (category_index == category).nonzero()[:, 0].tolist():
                out[i] = torch.cdist(queries[i], rows).amin(dim=1)
        return out.reshape(b, 1, h, w)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        # The bank's length comes from the training data: take the stored one (the channels must still match).
        for name in BANK_BUFFERS:
            stored = state_dict.get(prefix + name)
            if stored is not None and stored.shape[1:] == getattr(self, name).shape[1:]:
                setattr(self, name, torch.empty_like(stored, device=getattr(self, name).device))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
