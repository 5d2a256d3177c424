"""Anti-aliased shapes as coverage maps (float32 H×W in [0, 1]) from approximate signed distances.

A signed distance `sdf` is in pixels, negative inside; `coverage(sdf, ramp)` turns it into an alpha
that falls from 1 to 0 over `ramp` pixels centred on the boundary, so `alpha >= 0.5` is the shape.
Shared by the synthetic object renderer and the defect library.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from scipy import ndimage


@lru_cache(maxsize=16)
def _grid(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    yy.setflags(write=False)
    xx.setflags(write=False)
    return yy, xx


def grid(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates (y, x), float32, read-only and cached."""
    return _grid(int(h), int(w))


def coverage(sdf: np.ndarray, ramp: float = 1.0) -> np.ndarray:
    """Alpha in [0, 1] from a signed distance (pixels, negative inside); the ramp is centred on sdf = 0."""
    return np.clip(0.5 - sdf / max(ramp, 1e-6), 0.0, 1.0).astype(np.float32)


def rotate(yy: np.ndarray, xx: np.ndarray, cy: float, cx: float, angle: float) -> tuple[np.ndarray, np.ndarray]:
    """Coordinates relative to (cy, cx) in a frame rotated by `angle` radians: returns (v, u)."""
    c, s = np.cos(angle), np.sin(angle)
    dy, dx = yy - cy, xx - cx
    return (-s * dx + c * dy), (c * dx + s * dy)


def ellipse_sdf(shape: tuple[int, int], cy: float, cx: float, a: float, b: float, angle: float = 0.0) -> np.ndarray:
    """Approximate signed distance to an ellipse with semi-axes a (along u) and b (along v)."""
    v, u = rotate(*grid(*shape), cy, cx, angle)
    f = (u / a) ** 2 + (v / b) ** 2 - 1.0
    grad = 2.0 * np.sqrt((u / a**2) ** 2 + (v / b**2) ** 2) + 1e-6
    return f / grad


def blob_sdf(
    shape: tuple[int, int], cy: float, cx: float, radius: float, rng: np.random.Generator, wobble: float = 0.18
) -> np.ndarray:
    """An irregular closed shape: a circle whose radius varies smoothly with the angle (harmonics 2-4)."""
    yy, xx = grid(*shape)
    dy, dx = yy - cy, xx - cx
    theta = np.arctan2(dy, dx)
    r_theta = np.ones_like(theta)
    for k in (2, 3, 4):
        r_theta += rng.uniform(-wobble, wobble) / (k - 1) * np.cos(k * theta + rng.uniform(0, 2 * np.pi))
    return np.hypot(dy, dx) - radius * r_theta


def polyline_distance(shape: tuple[int, int], points: np.ndarray) -> np.ndarray:
    """Distance (pixels) from every pixel centre to a polyline given as (N, 2) points (y, x)."""
    yy, xx = grid(*shape)
    dist = np.full(shape, np.inf, dtype=np.float32)
    for (y0, x0), (y1, x1) in zip(points[:-1], points[1:]):
        sy, sx = y1 - y0, x1 - x0
        length2 = max(sy * sy + sx * sx, 1e-9)
        t = np.clip(((yy - y0) * sy + (xx - x0) * sx) / length2, 0.0, 1.0)
        np.minimum(dist, np.hypot(yy - (y0 + t * sy), xx - (x0 + t * sx)), out=dist)
    return dist


def smooth_noise(shape: tuple[int, int], rng: np.random.Generator, sigma: float) -> np.ndarray:
    """Smooth random field in [0, 1] (Gaussian-filtered white noise, min-max scaled)."""
    field = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma, mode="wrap")
    lo, hi = float(field.min()), float(field.max())
    return (field - lo) / max(hi - lo, 1e-6)


# ---- what is object and what is background --------------------------------------------------


@dataclass(frozen=True)
class Backdrop:
    """A plain background (fitted as a colour plane over the image border) and the object on it, if any."""

    plane: np.ndarray  # float32 H×W×3 background colour everywhere
    spread: float  # robust noise level of the border
    distance: np.ndarray  # float32 H×W: largest channel difference from the plane
    foreground: np.ndarray | None  # bool H×W, or None when the image is not one object on a plain background


def _border(img: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray]:
    keep = np.zeros(img.shape[:2], dtype=bool)
    keep[:width], keep[-width:], keep[:, :width], keep[:, -width:] = True, True, True, True
    return keep, img[keep]


def estimate_backdrop(img: np.ndarray) -> Backdrop:
    """Fit a colour plane to the border; pixels far from it are foreground when that looks like an object."""
    h, w = img.shape[:2]
    keep, pixels = _border(img, max(1, min(h, w) // 32))
    yy, xx = grid(h, w)
    design = np.stack([np.ones(pixels.shape[0], np.float32), yy[keep] / h, xx[keep] / w], axis=1)
    coef, *_ = np.linalg.lstsq(design, pixels, rcond=None)
    plane = (coef[0] + (yy / h)[..., None] * coef[1] + (xx / w)[..., None] * coef[2]).astype(np.float32)
    residual = np.abs(pixels - plane[keep]).max(axis=1)
    spread = float(np.median(residual) * 1.4826)
    dist = np.abs(img - plane).max(axis=2)
    fg = ndimage.binary_opening(dist > max(0.1, 6.0 * spread), iterations=1)
    frac, border_frac = float(fg.mean()), float(fg[keep].mean())
    is_object = spread < 0.06 and 0.02 < frac < 0.85 and border_frac < 0.05
    return Backdrop(plane=plane, spread=spread, distance=dist, foreground=fg if is_object else None)


def pick_point(
    rng: np.random.Generator, shape: tuple[int, int], region: np.ndarray | None, margin: float
) -> tuple[float, float]:
    """A random (y, x): inside `region` (a bool map) when it has pixels, else uniformly `margin` from the edges."""
    h, w = shape
    if region is not None and region.any():
        ys, xs = np.nonzero(region)
        i = int(rng.integers(len(ys)))
        return float(ys[i] + rng.uniform(-0.5, 0.5)), float(xs[i] + rng.uniform(-0.5, 0.5))
    my, mx = min(margin, h / 2 - 1), min(margin, w / 2 - 1)
    return float(rng.uniform(my, h - 1 - my)), float(rng.uniform(mx, w - 1 - mx))
