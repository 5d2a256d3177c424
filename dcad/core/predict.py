"""Scoring of raw images (any size; RGB uint8): shared by `dcad predict` and the MLflow pyfunc model."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from dcad.core.errors import DcadError
from dcad.core.model.drdc import DRDC


@dataclass
class PredictionResult:
    scores: np.ndarray  # [N] raw image scores
    normalized_scores: np.ndarray  # [N] in [0,1], threshold ↦ 0.5
    decisions: np.ndarray  # [N] bool: score > image threshold
    anomaly_maps: np.ndarray  # [N,S,S] float32 at the model's resolution
    categories: list[str]


def to_tensor(images: list[np.ndarray], size: int) -> torch.Tensor:
    """uint8 HxWx3 arrays of any size -> float [N,3,size,size] in [0,1] (antialiased bilinear resize)."""
    out = []
    for arr in images:
        if arr.ndim != 3 or arr.shape[2] != 3:
            raise DcadError(f"expected an RGB image array HxWx3, got shape {tuple(arr.shape)}")
        t = torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1).float().div(255.0).unsqueeze(0)
        if t.shape[-2:] != (size, size):
            t = F.interpolate(t, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        out.append(t)
    return torch.cat(out).clamp(0.0, 1.0)


@torch.no_grad()
def predict_arrays(model: DRDC, images: list[np.ndarray], category: str | None = None) -> PredictionResult:
    device = model.prototypes.device
    x = to_tensor(images, model.image_size).to(device)
    cats = None
    if category is not None:
        if category not in model.categories:
            raise DcadError(f"unknown category '{category}' (the model knows: {', '.join(model.categories)})")
        cats = model.category_indices([category] * len(images)).to(device)
    pred = model(x, cats)
    scores = pred.image_score.cpu()
    cal = model.calibration
    return PredictionResult(
        scores=scores.numpy().astype(np.float64),
        normalized_scores=cal.normalise_scores(scores).numpy().astype(np.float64),
        decisions=(scores > cal.image_threshold.cpu()).numpy(),
        anomaly_maps=pred.anomaly_map[:, 0].cpu().numpy().astype(np.float32),
        categories=[model.categories[i] for i in pred.category_index.cpu().tolist()],
    )
