"""Normal images of the synthetic benchmark: texture crops of real photographs and drawn objects.

Every renderer maps (rng, size) to a clean float32 size×size×3 image in [0, 1]; sensor noise is
added later by the generator (after any defect), so defects see the clean render.

- Textures cut from the photographs scikit-image ships (no download): ``brick`` (anisotropic: flips
  only), ``grass`` and ``gravel`` (isotropic: flips and 90° rotations). Each is a random crop at a
  jittered scale, tinted, with small brightness/contrast/colour jitter and an illumination ramp.
- Objects drawn from signed distances with anti-aliased edges, at a random pose on a plain,
  slightly shaded background: ``hex_nut`` (hexagon with a threaded hole, chamfered corners),
  ``capsule`` (two-colour pill with a seam and a highlight), ``gear`` (12 teeth, a keyed bore and five
  lightening holes; supersampled).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cache

import numpy as np
import skimage.data
from skimage.transform import resize
from skimage.util import img_as_float32

from dcad.core.data.shapes import coverage, grid

Renderer = Callable[[np.random.Generator, int], np.ndarray]


@dataclass(frozen=True)
class Category:
    """One synthetic category: how its normal images look and which defects its test set holds."""

    name: str
    kind: str  # "texture" | "object"
    render: Renderer
    defects: tuple[str, ...]
    noise: float = 0.01  # sensor noise (std, [0, 1] units) added after defects


# ---- shared helpers -------------------------------------------------------------------------


def _ramp(rng: np.random.Generator, size: int, amount: float) -> np.ndarray:
    """A gentle linear illumination ramp (H×W×1) with a random direction, ±amount."""
    yy, xx = grid(size, size)
    angle = rng.uniform(0, 2 * np.pi)
    ramp = ((yy - size / 2) * np.sin(angle) + (xx - size / 2) * np.cos(angle)) / size
    return (1.0 + 2.0 * amount * ramp)[..., None]


def _jitter(colour: tuple[float, float, float], rng: np.random.Generator, amount: float) -> np.ndarray:
    return np.clip(np.array(colour, np.float32) + rng.uniform(-amount, amount, 3), 0.0, 1.0).astype(np.float32)


def _background(rng: np.random.Generator, size: int, colour: tuple[float, float, float]) -> np.ndarray:
    base = _jitter(colour, rng, 0.02)
    return np.broadcast_to(base, (size, size, 3)) * _ramp(rng, size, 0.03)


def _blend(under: np.ndarray, over: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    return under + alpha[..., None] * (over - under)


def _centre(rng: np.random.Generator, size: int) -> tuple[float, float]:
    return tuple(float(v) for v in size / 2 - 0.5 + rng.normal(0.0, 0.03 * size, 2).clip(-0.07 * size, 0.07 * size))


# ---- textures -------------------------------------------------------------------------------


@cache
def source_photo(name: str) -> np.ndarray:
    """A greyscale photograph shipped with scikit-image, as float32 in [0, 1] (loaded once)."""
    photo = img_as_float32(getattr(skimage.data, name)())
    photo.setflags(write=False)
    return photo


@dataclass(frozen=True)
class Texture:
    photo: str
    crop: float  # crop side as a fraction of the photo side (before ±4 % jitter)
    dark: tuple[float, float, float]  # colour of black in the tint
    light: tuple[float, float, float]  # colour of white in the tint
    isotropic: bool

    def __call__(self, rng: np.random.Generator, size: int) -> np.ndarray:
        photo = source_photo(self.photo)
        side = int(min(photo.shape[0], round(self.crop * photo.shape[0] * rng.uniform(0.96, 1.04))))
        y0, x0 = (int(rng.integers(0, n - side + 1)) for n in photo.shape[:2])
        crop = photo[y0 : y0 + side, x0 : x0 + side]
        if self.isotropic:
            crop = np.rot90(crop, int(rng.integers(4)))
        if rng.random() < 0.5:
            crop = crop[:, ::-1]
        if rng.random() < 0.5:
            crop = crop[::-1]
        grey = resize(crop, (size, size), order=1, anti_aliasing=True).astype(np.float32)
        grey = (grey - 0.5) * rng.uniform(0.96, 1.04) + 0.5 + rng.uniform(-0.025, 0.025)
        dark, light = _jitter(self.dark, rng, 0.015), _jitter(self.light, rng, 0.02)
        rgb = dark + grey[..., None] * (light - dark)
        return np.clip(rgb * _ramp(rng, size, 0.03), 0.0, 1.0).astype(np.float32)


# ---- objects --------------------------------------------------------------------------------


def hex_nut(rng: np.random.Generator, size: int) -> np.ndarray:
    """A hex nut seen from above: chamfered corners, a dark threaded hole, lit from one side."""
    img = _background(rng, size, (0.16, 0.17, 0.2))
    yy, xx = grid(size, size)
    cy, cx = _centre(rng, size)
    radius = 0.3 * size * rng.uniform(0.95, 1.05)
    apothem = radius * np.cos(np.pi / 6)
    angle = rng.uniform(0, np.pi / 3)
    dy, dx = yy - cy, xx - cx
    normals = [angle + k * np.pi / 3 for k in range(3)]
    hexagon = np.max([np.abs(dx * np.cos(a) + dy * np.sin(a)) for a in normals], axis=0) - apothem
    r = np.hypot(dy, dx)
    hole_r = 0.42 * apothem * rng.uniform(0.96, 1.04)
    body = coverage(np.maximum(hexagon, hole_r - r))
    light = rng.uniform(0, 2 * np.pi)
    shade = 1.0 + 0.1 * np.cos(np.arctan2(dy, dx) - light) * np.clip(r / apothem, 0, 1)
    shade *= 1.0 - 0.25 * (1.0 - coverage(r - 0.95 * apothem))  # chamfered corners are darker
    shade *= 1.0 - 0.3 * coverage(r - 1.3 * hole_r)  # thread ring around the hole
    metal = _jitter((0.62, 0.63, 0.66), rng, 0.03)
    return np.clip(_blend(img, metal * shade[..., None], body), 0.0, 1.0).astype(np.float32)


def capsule(rng: np.random.Generator, size: int) -> np.ndarray:
    """A two-colour capsule at any orientation: rounded cylinder, seam, specular highlight."""
    img = _background(rng, size, (0.24, 0.3, 0.28))
    yy, xx = grid(size, size)
    cy, cx = _centre(rng, size)
    half = 0.22 * size * rng.uniform(0.95, 1.05)
    radius = 0.14 * size * rng.uniform(0.95, 1.05)
    angle = rng.uniform(0, 2 * np.pi)
    c, s = np.cos(angle), np.sin(angle)
    u = c * (xx - cx) + s * (yy - cy)
    v = -s * (xx - cx) + c * (yy - cy)
    body = coverage(np.hypot(np.maximum(np.abs(u) - half, 0.0), v) - radius)
    cap_a, cap_b = _jitter((0.78, 0.16, 0.14), rng, 0.03), _jitter((0.93, 0.9, 0.78), rng, 0.02)
    colour = _blend(np.broadcast_to(cap_a, (size, size, 3)), np.broadcast_to(cap_b, (size, size, 3)), coverage(-u))
    across = np.clip(np.abs(v) / radius, 0.0, 1.0)
    shade = 0.72 + 0.28 * np.sqrt(1.0 - across**2)
    shade *= 1.0 - 0.15 * coverage(np.abs(u) - 0.5)  # seam between the halves
    highlight = 0.22 * np.exp(-(((v - 0.4 * radius) / (0.12 * radius)) ** 2)) * coverage(np.abs(u) - half)
    pill = colour * shade[..., None] + highlight[..., None]
    return np.clip(_blend(img, pill, body), 0.0, 1.0).astype(np.float32)


def supersampling(size: int) -> int:
    """Sub-samples per pixel side for the gear: 4 up to 128 px, fewer for larger images (same cost)."""
    return max(2, min(4, 512 // size))


def _gear_coverage(rng: np.random.Generator, size: int, cy: float, cx: float) -> np.ndarray:
    """Fraction of each pixel covered by the gear (supersampled), with bore, keyway and holes."""
    factor = supersampling(size)
    yy, xx = grid(size * factor, size * factor)
    dy = (yy + 0.5) / factor - 0.5 - cy
    dx = (xx + 0.5) / factor - 0.5 - cx
    r, theta = np.hypot(dy, dx), np.arctan2(dy, dx)
    scale = rng.uniform(0.96, 1.04)
    root, tip, teeth = 0.29 * size * scale, 0.37 * size * scale, 12
    phase = rng.uniform(0, 2 * np.pi)
    t = np.mod((theta - phase) * teeth / (2 * np.pi), 1.0)
    tooth = np.clip(np.minimum(t - 0.05, 0.55 - t) / 0.1, 0.0, 1.0)
    solid = r <= root + (tip - root) * tooth
    bore = 0.08 * size * scale
    along = dx * np.cos(phase) + dy * np.sin(phase)
    across = -dx * np.sin(phase) + dy * np.cos(phase)
    keyway = (along > 0) & (along < bore + 0.035 * size) & (np.abs(across) < 0.022 * size)
    solid &= (r > bore) & ~keyway
    for k in range(5):
        a = phase + (k + 0.5) * 2 * np.pi / 5
        solid &= np.hypot(dy - 0.19 * size * scale * np.sin(a), dx - 0.19 * size * scale * np.cos(a)) > 0.045 * size
    return solid.reshape(size, factor, size, factor).mean(axis=(1, 3)).astype(np.float32)


def gear(rng: np.random.Generator, size: int) -> np.ndarray:
    """A brass spur gear seen from above, at any rotation."""
    img = _background(rng, size, (0.84, 0.85, 0.86))
    cy, cx = _centre(rng, size)
    body = _gear_coverage(rng, size, cy, cx)
    yy, xx = grid(size, size)
    dy, dx = yy - cy, xx - cx
    r = np.hypot(dy, dx)
    light = rng.uniform(0, 2 * np.pi)
    shade = 0.88 + 0.12 * np.cos(np.arctan2(dy, dx) - light) * np.clip(r / (0.3 * size), 0, 1)
    shade *= 1.0 + 0.08 * coverage(r - 0.13 * size)  # raised hub
    brass = _jitter((0.8, 0.64, 0.3), rng, 0.03)
    return np.clip(_blend(img, brass * shade[..., None], body), 0.0, 1.0).astype(np.float32)


CATEGORY_LIST: tuple[Category, ...] = (
    Category("brick", "texture", Texture("brick", 0.45, (0.12, 0.05, 0.03), (0.98, 0.7, 0.55), isotropic=False),
             ("scratch", "hole", "stain", "cut_paste", "faint_scratch"), noise=0.006),
    Category("grass", "texture", Texture("grass", 0.55, (0.03, 0.1, 0.02), (0.75, 0.95, 0.5), isotropic=True),
             ("scratch", "hole", "stain", "cut_paste"), noise=0.006),
    Category("gravel", "texture", Texture("gravel", 0.55, (0.08, 0.08, 0.09), (0.95, 0.92, 0.86), isotropic=True),
             ("scratch", "hole", "stain", "cut_paste"), noise=0.006),
    Category("hex_nut", "object", hex_nut, ("scratch", "hole", "cut_paste", "missing_part", "faint_stain")),
    Category("capsule", "object", capsule, ("scratch", "hole", "stain", "missing_part", "faint_scratch")),
    Category("gear", "object", gear, ("scratch", "stain", "cut_paste", "missing_part", "faint_stain")),
)
CATEGORY_MAP = {c.name: c for c in CATEGORY_LIST}
