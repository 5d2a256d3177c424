"""Windows of an image picked by its base anomaly map, for refinement on a budget.

`peak_windows` places K non-overlapping square windows per image on a grid of step `align` (so that the
inpainting cells inside a window are the same cells as in the whole image), each centred where the
window-averaged base map is highest among the places not yet covered. `crop_windows` cuts them out of
image-sized tensors; `paste_windows` writes per-window maps back into an image-sized map.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from dcad.core.errors import ModelError


def check_window(size: int, align: int, height: int, width: int) -> None:
    if size % align or size > min(height, width):
        raise ModelError(f"refiner.budget.window_size={size}: must be a multiple of {align} (the largest patch size "
                         f"and the denoiser's size multiple) and at most the image side {min(height, width)}")


@torch.no_grad()
def peak_windows(score_map: Tensor, count: int, size: int, align: int) -> Tensor:
    """Top-left corners [B,K,2] (row, col) of `count` windows of side `size` on maps [B,1,H,W].

    Candidates are the windows at multiples of `align`; each pick is the candidate with the highest mean
    score that does not overlap an earlier pick (once none is left, the best candidate overall)."""
    b, _, h, w = score_map.shape
    check_window(size, align, h, w)
    means = F.avg_pool2d(score_map.float(), kernel_size=(size, 1), stride=(align, 1))  # separable box filter
    means = F.avg_pool2d(means, kernel_size=(1, size), stride=(1, align))  # [B,1,R,C]
    rows, cols = means.shape[-2:]
    flat = means.flatten(1).clone()  # [B, R·C]
    r_idx = torch.arange(rows, device=flat.device).repeat_interleave(cols) * align
    c_idx = torch.arange(cols, device=flat.device).repeat(rows) * align
    picked, free = [], torch.ones_like(flat, dtype=torch.bool)
    for _ in range(count):
        best = torch.where(free, flat, torch.full_like(flat, -torch.inf)).argmax(dim=1)
        exhausted = ~free.gather(1, best[:, None])[:, 0]
        best = torch.where(exhausted, flat.argmax(dim=1), best)
        r0, c0 = r_idx[best], c_idx[best]
        picked.append(torch.stack([r0, c0], dim=1))
        overlap = ((r_idx[None] - r0[:, None]).abs() < size) & ((c_idx[None] - c0[:, None]).abs() < size)
        free &= ~overlap
    return torch.stack(picked, dim=1)


def crop_windows(x: Tensor, corners: Tensor, size: int) -> Tensor:
    """[B,C,H,W] and corners [B,K,2] → [B·K,C,size,size] (image-major)."""
    return torch.stack([x[i, :, r:r + size, c:c + size] for i, row in enumerate(corners.tolist()) for r, c in row])


def paste_windows(maps: Tensor, corners: Tensor, height: int, width: int, fill: float = float("nan")) -> Tensor:
    """Per-window maps [B·K,*C,size,size] → [B,*C,H,W], `fill` outside every window (later windows win)."""
    b, k = corners.shape[:2]
    size = maps.shape[-1]
    out = maps.new_full((b, *maps.shape[1:-2], height, width), fill)
    windows = maps.reshape(b, k, *maps.shape[1:])
    for i, row in enumerate(corners.tolist()):
        for j, (r, c) in enumerate(row):
            out[i, ..., r:r + size, c:c + size] = windows[i, j]
    return out
