"""Anomaly-map rendering: heatmaps, overlays and contact sheets (numpy + matplotlib colormaps)."""

from __future__ import annotations

import numpy as np
from matplotlib import colormaps
from PIL import Image


def heatmap_rgb(anomaly_map: np.ndarray, vmin: float, vmax: float, cmap: str = "jet") -> np.ndarray:
    """[H,W] float -> uint8 [H,W,3], values mapped linearly from [vmin, vmax]."""
    span = max(vmax - vmin, 1e-8)
    scaled = np.clip((anomaly_map - vmin) / span, 0.0, 1.0)
    return (colormaps[cmap](scaled)[..., :3] * 255).astype(np.uint8)


def resize_map(anomaly_map: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of a float map to (width, height)."""
    img = Image.fromarray(anomaly_map.astype(np.float32), mode="F")
    return np.asarray(img.resize(size, Image.Resampling.BILINEAR), dtype=np.float32)


def overlay(image: np.ndarray, heat: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """Blend a uint8 RGB heatmap over a uint8 RGB image of the same size."""
    out = (1 - alpha) * image.astype(np.float32) + alpha * heat.astype(np.float32)
    return out.clip(0, 255).astype(np.uint8)


def mask_outline(mask: np.ndarray) -> np.ndarray:
    """Boolean outline (1 px) of a boolean mask."""
    m = mask.astype(bool)
    inner = m.copy()
    inner[1:, :] &= m[:-1, :]
    inner[:-1, :] &= m[1:, :]
    inner[:, 1:] &= m[:, :-1]
    inner[:, :-1] &= m[:, 1:]
    return m & ~inner


def grid(tiles: list[list[np.ndarray]], pad: int = 2) -> np.ndarray:
    """Rows of equally sized uint8 RGB tiles -> one uint8 image."""
    h, w = tiles[0][0].shape[:2]
    cols = max(len(r) for r in tiles)
    out = np.full((len(tiles) * (h + pad) + pad, cols * (w + pad) + pad, 3), 255, np.uint8)
    for i, row in enumerate(tiles):
        for j, tile in enumerate(row):
            y, x = pad + i * (h + pad), pad + j * (w + pad)
            out[y : y + h, x : x + w] = tile
    return out
