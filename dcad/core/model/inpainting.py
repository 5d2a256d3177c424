"""Selected-timestep diffusion inpainting and the high-frequency refinement maps.

For each selected timestep τ and scale s, the image is noised to τ with a fixed noise field, and the
denoiser predicts x̂0 of each of the scale's complementary mask groups (one step, or a few deterministic
DDIM steps down to 0). The masked region of every group is pasted into one inpainted image x̂(τ, s):
every pixel is predicted from its surroundings, never from itself. The refinement map compares the
high-frequency bands of x and x̂, where the defects (edges, scratches, holes) and not the denoiser's
small colour / low-frequency offsets live.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import Tensor

from dcad.core.config import RefinerConfig
from dcad.core.errors import ModelError
from dcad.core.model.denoiser import Denoiser
from dcad.core.model.fusion import gaussian_blur
from dcad.core.model.noise import build_scheduler, ddim_move, predict_x0
from dcad.core.model.precision import uses_bfloat16


# ---- masks -------------------------------------------------------------------------------------------


def _group_of_cells(rows: Tensor, cols: Tensor, groups: int) -> Tensor:
    """Group index of each s×s cell: a g×g lattice when G = g² (G=4: every masked cell is surrounded by
    visible ones; G=2 is handled as the checkerboard (i+j) mod 2), else diagonal stripes (i+j) mod G."""
    g = math.isqrt(groups)
    if g * g == groups and groups > 1 and groups != 2:
        return (rows % g) * g + (cols % g)
    return (rows + cols) % groups


@lru_cache(maxsize=64)
def _cached_masks(height: int, width: int, patch_size: int, groups: int) -> Tensor:
    rows = (torch.arange(height) // patch_size).unsqueeze(1)
    cols = (torch.arange(width) // patch_size).unsqueeze(0)
    owner = _group_of_cells(rows, cols, groups)  # [H,W]
    return (owner.unsqueeze(0) == torch.arange(groups).reshape(-1, 1, 1)).float().unsqueeze(1)


def inpainting_masks(height: int, width: int, patch_size: int, groups: int) -> Tensor:
    """[G,1,H,W] binary masks (1 = to inpaint) of s×s cells in G complementary groups (sum over G is 1)."""
    if patch_size < 1 or groups < 2 or height < 1 or width < 1:
        raise ModelError(
            f"inpainting masks need patch_size ≥ 1 and groups ≥ 2 (got patch_size={patch_size}, groups={groups}, "
            f"size {height}×{width})"
        )
    return _cached_masks(height, width, patch_size, groups).clone()


# ---- high frequency ----------------------------------------------------------------------------------


def high_frequency(x: Tensor, kind: str, sigma: float, inner_sigma: float = 0.0) -> Tensor:
    """The high band of images [..., H, W].

    ``gaussian``: x − G_σ * x. ``laplacian``: the finest Laplacian-pyramid level,
    x − up2(down2(G_σ * x)) (bilinear), a slightly wider band than ``gaussian`` at the same σ.
    ``inner_sigma > 0`` first blurs x by G_inner, which turns either into a band-pass (a difference of
    Gaussians): it drops the finest band, which a one-step denoiser cannot reproduce on stochastic textures.
    """
    if inner_sigma > 0:
        x = gaussian_blur(x, inner_sigma)
    if kind == "gaussian":
        return x - gaussian_blur(x, sigma)
    if kind == "laplacian":
        h, w = x.shape[-2:]
        flat = gaussian_blur(x, sigma).reshape(-1, 1, h, w)
        coarse = F.avg_pool2d(flat, 2, ceil_mode=True)
        up = F.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False)
        return x - up.reshape(x.shape)
    raise ModelError(f"unknown high-frequency kind '{kind}' (gaussian or laplacian)")


# ---- inference ---------------------------------------------------------------------------------------


def fixed_noise(seed: int, height: int, width: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """The noise field used for every image and call: [1,3,H,W], drawn on CPU (same on every device)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn((1, 3, height, width), generator=gen).to(device=device, dtype=dtype)


def ddim_schedule(tau: int, steps: int) -> list[int]:
    """`steps` timesteps visited from τ towards 0, e.g. (250, 3) → [250, 167, 83]; the last predicts x̂0."""
    return [max(1, round(tau * (steps - i) / steps)) for i in range(steps)]


class InpaintingRefiner:
    """Stateless helper: a `Denoiser`, its noise schedule and the refiner config."""

    def __init__(self, denoiser: Denoiser, cfg: RefinerConfig, scheduler=None) -> None:
        self.denoiser = denoiser
        self.cfg = cfg
        self.scheduler = scheduler if scheduler is not None else build_scheduler(cfg.scheduler)
        top = self.scheduler.config.num_train_timesteps - 1
        bad = [t for t in cfg.timesteps if not 1 <= t <= top]
        if bad:
            raise ModelError(f"refiner.timesteps {bad} out of range [1, {top}] for num_train_timesteps={top + 1}")

    @property
    def use_guidance(self) -> bool:
        return self.cfg.class_conditioning and self.cfg.guidance_scale != 1.0

    # -- inpainting --
    @torch.no_grad()
    def inpaint(self, images: Tensor, base_maps: Tensor | None, class_labels: Tensor | None,
                noise: Tensor | None = None, area_ratio: float = 1.0) -> Tensor:
        """images [B,3,H,W] in [0,1] → inpainted x̂ [B,T,S,3,H,W] in [0,1] (all groups pasted).

        `noise` [B,3,H,W] replaces the fixed noise field (windows of an image take their part of the image's
        field); `area_ratio` > 1 says the images are windows that many times smaller than a whole image, so
        each UNet call takes that many times more of them (`max_batch` counts whole images)."""
        self._check_images(images)
        was_training = self.denoiser.training
        self.denoiser.eval()
        try:
            return self._inpaint(images, base_maps, class_labels, noise, area_ratio)
        finally:
            self.denoiser.train(was_training)

    def _check_images(self, images: Tensor) -> None:
        if images.dim() != 4 or images.shape[1] != 3:
            raise ModelError(f"refiner expects images [B,3,H,W], got {list(images.shape)}")
        self.denoiser.check_size(*images.shape[-2:])

    def _inpaint(self, images: Tensor, base_maps: Tensor | None, class_labels: Tensor | None, noise: Tensor | None,
                 area_ratio: float) -> Tensor:
        device = next(self.denoiser.parameters()).device
        x = images.to(device=device, dtype=torch.float32) * 2.0 - 1.0
        b, _, h, w = x.shape
        cfg = self.cfg
        masks = torch.cat([inpainting_masks(h, w, s, cfg.groups) for s in cfg.patch_sizes]).to(device)  # [S·G,1,H,W]
        if noise is None:
            noise = fixed_noise(cfg.seed, h, w, device, x.dtype)
        noise = noise.to(device=device, dtype=x.dtype).expand(b, 3, h, w)
        base = base_maps.to(device=device, dtype=x.dtype) if base_maps is not None else None
        labels = class_labels.to(device) if class_labels is not None else None
        # Every UNet sample is one (τ, s, g, image); flattened τ-major, image-minor.
        n_sg, n_t = masks.shape[0], len(cfg.timesteps)
        combos = torch.arange(n_t * n_sg * b, device=device)
        t_idx, sg_idx, img_idx = combos // (n_sg * b), (combos // b) % n_sg, combos % b
        timesteps = torch.tensor(cfg.timesteps, device=device)
        per_call = max(1, int(cfg.max_batch * max(1.0, area_ratio)) // (2 if self.use_guidance else 1))
        pasted = torch.zeros(n_t, n_sg, b, 3, h, w, device=device)
        for chunk in torch.split(torch.arange(len(combos), device=device), per_call):
            ti, sgi, bi = t_idx[chunk], sg_idx[chunk], img_idx[chunk]
            m = masks[sgi]
            x0_hat = self._predict_clean(
                x[bi], noise[bi], timesteps[ti], m, None if base is None else base[bi], None if labels is None else labels[bi]
            )
            pasted[ti, sgi, bi] = x0_hat * m
        pasted = pasted.reshape(n_t, len(cfg.patch_sizes), cfg.groups, b, 3, h, w).sum(dim=2)
        return ((pasted.clamp(-1.0, 1.0) + 1.0) / 2.0).permute(2, 0, 1, 3, 4, 5).contiguous()

    def _predict_clean(self, x: Tensor, noise: Tensor, tau: Tensor, mask: Tensor, base: Tensor | None, labels: Tensor | None) -> Tensor:
        """x̂0 of one chunk: from x_τ in one step, or by deterministic DDIM steps (known region re-noised)."""
        sched = self.scheduler
        x_t = sched.add_noise(x, noise, tau)
        context = x * (1.0 - mask)
        n = self.cfg.ddim_steps
        schedule = torch.tensor([ddim_schedule(int(t), n) for t in tau.tolist()], device=x.device)  # [N, n]
        for k in range(n):
            t = schedule[:, k]
            x0 = predict_x0(sched, self._model(x_t, t, context, mask, base, labels), t, x_t)
            if k == n - 1:
                break
            t_next = schedule[:, k + 1]
            x_t = mask * ddim_move(sched, x_t, x0, t, t_next) + (1.0 - mask) * sched.add_noise(x, noise, t_next)
        return x0

    def _model(self, x_t: Tensor, t: Tensor, context: Tensor, mask: Tensor, base: Tensor | None, labels: Tensor | None) -> Tensor:
        with torch.autocast(x_t.device.type, dtype=torch.bfloat16, enabled=uses_bfloat16(self.cfg.precision, x_t.device)):
            if self.use_guidance:
                out = self.denoiser.guided(x_t, t, context, mask, base, labels, self.cfg.guidance_scale)
            else:
                out = self.denoiser(x_t, t, context, mask, base, labels)
        return out.float()

    # -- comparison --
    def refinement_maps(self, images: Tensor, inpainted: Tensor) -> Tensor:
        """[B,T,S,H,W]: L2 norm over colour channels of HF(x) − HF(x̂) (images in [0,1]).

        L2 (not a sum of absolute values) so that a colour-only change counts like a change in brightness
        of the same size, independent of the channel it lies in.
        """
        x = images.to(inpainted.device, inpainted.dtype).unsqueeze(1).unsqueeze(1)
        cfg = self.cfg
        diff = high_frequency(x - inpainted, cfg.hf_kind, cfg.hf_sigma, cfg.hf_inner_sigma)  # HF is linear
        return diff.pow(2).sum(dim=3).sqrt()
