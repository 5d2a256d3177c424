"""The defect library, shared by the synthetic benchmark generator and the validation split.

Each entry of `DEFECTS` maps an image (float32 H×W×3 in [0, 1]) and a `np.random.Generator` to a
defective copy and its exact bool mask. Sizes scale with the image, so the same library serves a
128 px benchmark and a 64 px validation image.

The mask is the designed region (alpha >= 0.5 of an anti-aliased shape) intersected with the pixels
that changed by more than `CHANGED` in some channel; pixels outside the mask change only in the
1-2 px anti-aliasing ramp. On an object on a plain background (see `shapes.estimate_backdrop`),
defects are placed on the object and clipped to it. Every defect covers at least `MIN_AREA` of the
image (retried with fresh random draws until it does).

Defects:
- ``scratch``: a thin polyline (1.5-3.5 px), strongly brighter or darker.
- ``faint_scratch`` (subtle): a 1-2 px polyline changed by only 7-10 % of the intensity range.
- ``hole``: a dark (or, on very dark surfaces, bright) ellipse with a shaded interior.
- ``stain``: an irregular soft-edged blob tinted 35-55 % towards rust, ink or ochre (whichever
  differs most from the surface).
- ``faint_stain`` (subtle): the same blob shifted by only 7-10 % of the range.
- ``cut_paste``: an irregular patch copied from elsewhere in the image, rotated, magnified 1.5-2.2×
  and 15-30 % darker or brighter.
- ``missing_part``: a bite out of the object's outline, filled with the fitted background; on an
  image without a detectable object (a texture) it falls back to ``hole``.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from scipy import ndimage

from dcad.core.data.shapes import (
    blob_sdf,
    coverage,
    ellipse_sdf,
    estimate_backdrop,
    pick_point,
    polyline_distance,
    smooth_noise,
)

Defect = Callable[[np.ndarray, np.random.Generator], tuple[np.ndarray, np.ndarray]]

CHANGED = 0.01  # a mask pixel changed by more than this (in [0, 1] units) in some channel
MIN_AREA = 0.002  # smallest defect, as a fraction of the image area
ATTEMPTS = 24
SUBTLE = frozenset({"faint_scratch", "faint_stain"})


def _finish(img: np.ndarray, out: np.ndarray, region: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mask = designed region ∩ changed pixels; changes more than 2 px away from the mask are undone."""
    out = np.clip(out, 0.0, 1.0).astype(np.float32)
    mask = region & (np.abs(out - img).max(axis=2) > CHANGED)
    near = ndimage.binary_dilation(mask, iterations=2)
    return np.where(near[..., None], out, img), mask


def _valid(img: np.ndarray, out: np.ndarray, mask: np.ndarray, min_change: float) -> bool:
    area = int(mask.sum())
    if area < max(3, MIN_AREA * mask.size):
        return False
    return float(np.abs(out - img).max(axis=2)[mask].mean()) >= min_change


def _retry(
    img: np.ndarray, rng: np.random.Generator, build: Callable, min_change: float
) -> tuple[np.ndarray, np.ndarray]:
    """Draw `build(img, rng)` until the defect is large and visible enough; fall back to a solid blot."""
    img = np.asarray(img, dtype=np.float32)
    for _ in range(ATTEMPTS):
        out, mask = build(img, rng)
        if _valid(img, out, mask, min_change):
            return out, mask
    return _blot(img, rng)


def _blot(img: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """An ellipse filled with black or white (the opposite of its surroundings): never an empty mask."""
    h, w = img.shape[:2]
    radius = max(2.0, 0.08 * min(h, w))
    cy, cx = pick_point(rng, (h, w), None, margin=radius)
    alpha = coverage(ellipse_sdf((h, w), cy, cx, radius, radius * rng.uniform(0.6, 1.0), rng.uniform(0, np.pi)))
    region = alpha >= 0.5
    fill = 0.0 if _target_room(img, region) < 0 else 1.0
    return _finish(img, img + alpha[..., None] * (fill - img), region)


def _target_room(img: np.ndarray, region: np.ndarray, dark_below: float = 0.5) -> float:
    """+1 if the region's mean is below `dark_below` (so there is room to brighten it), else -1."""
    values = img[region] if region.any() else img.reshape(-1, 3)
    return 1.0 if float(values.mean()) < dark_below else -1.0


def _object_mask(img: np.ndarray) -> np.ndarray | None:
    return estimate_backdrop(img).foreground


def _placement(fg: np.ndarray | None, erode: int) -> np.ndarray | None:
    if fg is None:
        return None
    inner = ndimage.binary_erosion(fg, iterations=erode)
    return inner if inner.any() else fg


# ---- scratch ------------------------------------------------------------------------------------


def _polyline(rng: np.random.Generator, shape: tuple[int, int], fg: np.ndarray | None) -> np.ndarray:
    size = min(shape)
    start = pick_point(rng, shape, _placement(fg, max(1, size // 16)), margin=size * 0.2)
    n_seg = int(rng.integers(2, 5))
    step = rng.uniform(0.35, 0.6) * size / n_seg
    heading = rng.uniform(0, 2 * np.pi)
    points = [np.array(start)]
    for _ in range(n_seg):
        heading += rng.normal(0.0, 0.35)
        points.append(points[-1] + step * np.array([np.sin(heading), np.cos(heading)]))
    return np.stack(points)


def _build_scratch(img: np.ndarray, rng: np.random.Generator, faint: bool) -> tuple[np.ndarray, np.ndarray]:
    fg = _object_mask(img)
    width = rng.uniform(1.0, 2.0) if faint else rng.uniform(1.5, 3.5)
    alpha = coverage(polyline_distance(img.shape[:2], _polyline(rng, img.shape[:2], fg)) - width / 2)
    if fg is not None:
        alpha *= fg
    region = alpha >= 0.5
    sign = _target_room(img, region)
    if faint:
        out = img + (alpha * sign * rng.uniform(0.07, 0.1))[..., None]
    else:
        target = 0.95 if sign > 0 else 0.06
        out = img + (alpha * rng.uniform(0.6, 0.9))[..., None] * (target - img)
    return _finish(img, out, region)


def scratch(img: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    return _retry(img, rng, lambda i, r: _build_scratch(i, r, faint=False), 0.15)


def faint_scratch(img: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    return _retry(img, rng, lambda i, r: _build_scratch(i, r, faint=True), 0.03)


# ---- hole -----------------------------------------------------------------------------------


def _build_hole(img: np.ndarray, rng: np.random.Generator, on_object: bool = True) -> tuple[np.ndarray, np.ndarray]:
    h, w = img.shape[:2]
    size = min(h, w)
    fg = _object_mask(img) if on_object else None
    cy, cx = pick_point(rng, (h, w), _placement(fg, max(1, size // 12)), margin=size * 0.12)
    a = rng.uniform(0.045, 0.085) * size
    b = a * rng.uniform(0.6, 1.0)
    angle = rng.uniform(0, np.pi)
    sdf = ellipse_sdf((h, w), cy, cx, a, b, angle)
    alpha = coverage(sdf)
    region = alpha >= 0.5
    depth = np.clip(-sdf / max(b, 1.0), 0.0, 1.0)[..., None]  # 0 at the rim, 1 at the centre
    if _target_room(img, region, dark_below=0.2) > 0:
        inside = 0.75 + 0.2 * depth + 0.05 * img  # bright hole on a dark surface
    else:
        inside = 0.22 - 0.16 * depth + 0.1 * img
    out = img + alpha[..., None] * (inside - img)
    return _finish(img, out, region)


def hole(img: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    return _retry(img, rng, _build_hole, 0.2)


# ---- stain ----------------------------------------------------------------------------------


def _build_stain(img: np.ndarray, rng: np.random.Generator, faint: bool) -> tuple[np.ndarray, np.ndarray]:
    h, w = img.shape[:2]
    size = min(h, w)
    fg = _object_mask(img)
    cy, cx = pick_point(rng, (h, w), _placement(fg, max(1, size // 10)), margin=size * 0.15)
    alpha = coverage(blob_sdf((h, w), cy, cx, rng.uniform(0.07, 0.13) * size, rng), ramp=2.0)
    if fg is not None:
        alpha *= fg
    region = alpha >= 0.5
    strength = alpha * (0.8 + 0.2 * smooth_noise((h, w), rng, sigma=max(1.0, size / 32)))
    if faint:
        tint = np.array([1.0, 0.9, 0.7], np.float32) * rng.uniform(0.07, 0.1)
        out = img + (strength * _target_room(img, region))[..., None] * tint
    else:
        colour = _stain_colour(img, region)
        out = img + (strength * rng.uniform(0.35, 0.55))[..., None] * (colour - img)
    return _finish(img, out, region)


STAIN_COLOURS = np.array([[0.55, 0.2, 0.05], [0.2, 0.3, 0.75], [0.85, 0.75, 0.2]], np.float32)


def _stain_colour(img: np.ndarray, region: np.ndarray) -> np.ndarray:
    """Of rust, ink and ochre, the colour farthest from the region's mean colour."""
    mean = img[region].mean(axis=0) if region.any() else img.reshape(-1, 3).mean(axis=0)
    return STAIN_COLOURS[int(np.argmax(np.abs(STAIN_COLOURS - mean).sum(axis=1)))]


def stain(img: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    return _retry(img, rng, lambda i, r: _build_stain(i, r, faint=False), 0.08)


def faint_stain(img: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    return _retry(img, rng, lambda i, r: _build_stain(i, r, faint=True), 0.03)


# ---- cut and paste ------------------------------------------------------------------------------


def _build_cut_paste(img: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    h, w = img.shape[:2]
    size = min(h, w)
    fg = _object_mask(img)
    radius = rng.uniform(0.08, 0.13) * size
    dy, dx = pick_point(rng, (h, w), _placement(fg, max(1, size // 10)), margin=radius)
    sy, sx = pick_point(rng, (h, w), fg, margin=radius)
    angle, zoom = rng.uniform(0, 2 * np.pi), rng.uniform(1.5, 2.2)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    c, s = np.cos(angle) / zoom, np.sin(angle) / zoom
    src_y = sy + c * (yy - dy) - s * (xx - dx)
    src_x = sx + s * (yy - dy) + c * (xx - dx)
    pasted = np.stack(
        [ndimage.map_coordinates(img[..., ch], [src_y, src_x], order=1, mode="reflect") for ch in range(3)], axis=2
    )
    pasted *= rng.uniform(0.7, 0.85) if rng.random() < 0.5 else rng.uniform(1.15, 1.3)  # different lighting
    alpha = coverage(blob_sdf((h, w), dy, dx, radius, rng, wobble=0.25))
    out = img + alpha[..., None] * (pasted - img)
    return _finish(img, out, alpha >= 0.5)


def cut_paste(img: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    return _retry(img, rng, _build_cut_paste, 0.08)


# ---- missing part ---------------------------------------------------------------------------


def _fragments(solid: np.ndarray, cut: np.ndarray) -> np.ndarray:
    """Pieces of the object (largest part of `solid`) that the `cut` separates from it, grown by 1 px."""
    labels, count = ndimage.label(solid)
    if count == 0:
        return np.zeros(solid.shape, np.float32)
    body = labels == 1 + int(np.argmax(ndimage.sum(solid, labels, index=np.arange(1, count + 1))))
    parts, n_parts = ndimage.label(body & ~cut)
    if n_parts < 2:
        return np.zeros(solid.shape, np.float32)
    largest = 1 + int(np.argmax(ndimage.sum(body, parts, index=np.arange(1, n_parts + 1))))
    loose = (parts > 0) & (parts != largest)
    return ndimage.binary_dilation(loose, iterations=1).astype(np.float32)


def _build_missing_part(img: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    backdrop = estimate_backdrop(img)
    fg = backdrop.foreground
    if fg is None:
        return _build_hole(img, rng, on_object=False)
    h, w = img.shape[:2]
    outline = fg & ~ndimage.binary_erosion(fg)
    cy, cx = pick_point(rng, (h, w), outline, margin=0)
    bite = coverage(blob_sdf((h, w), cy, cx, rng.uniform(0.08, 0.14) * min(h, w), rng, wobble=0.2))
    solid = backdrop.distance > max(0.03, 4.0 * backdrop.spread)  # the object, thin parts and edges included
    alpha = bite * ndimage.binary_dilation(solid, iterations=1)
    alpha = np.maximum(alpha, _fragments(solid, alpha >= 0.5))  # no floating leftovers
    out = img + alpha[..., None] * (backdrop.plane - img)
    return _finish(img, out, alpha >= 0.5)


def missing_part(img: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    return _retry(img, rng, _build_missing_part, 0.1)


DEFECTS: dict[str, Defect] = {
    "scratch": scratch,
    "faint_scratch": faint_scratch,
    "hole": hole,
    "stain": stain,
    "faint_stain": faint_stain,
    "cut_paste": cut_paste,
    "missing_part": missing_part,
}
