"""Ground-truth regions for AUPRO: 8-connected components of each mask, and their pixel weights."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

# 8-connectivity inside each (H, W) plane of a (B, H, W) stack, never across images.
_PLANEWISE_8_CONNECTED = np.zeros((3, 3, 3), dtype=bool)
_PLANEWISE_8_CONNECTED[1] = True


def region_weights(masks: np.ndarray) -> tuple[np.ndarray, int]:
    """1/|region| of each anomalous pixel (in the C order of `masks[masks]`) and the number of
    regions in a (B, H, W) boolean stack.

    Summing the weights of the pixels above a threshold and dividing by the number of regions gives
    PRO: the mean over regions of the fraction of each region detected.
    """
    labels, n_regions = ndimage.label(masks, structure=_PLANEWISE_8_CONNECTED)
    if n_regions == 0:
        return np.zeros(0, np.float64), 0
    sizes = np.bincount(labels.ravel()).astype(np.float64)
    sizes[0] = np.inf  # label 0 is the background: weight 0
    inverse_size = 1.0 / sizes
    return inverse_size[labels[masks]], int(n_regions)
