"""Fit normalisation statistics and decision thresholds on the validation split (never on test).

The validation split is carved from the *normal training images*; half of it carries pasted synthetic
defects (see `dcad.core.data.validation`). Map statistics come from its normal images only; the
image and pixel thresholds maximise F1 over all of it.
"""

from __future__ import annotations

import copy

import numpy as np
import torch
from torch.utils.data import Dataset

from dcad.core.config import RefinementBudget
from dcad.core.errors import DatasetError
from dcad.core.inference import loader_for, predict_batches
from dcad.core.metrics import f1_max_threshold
from dcad.core.model.drdc import DRDC

MAX_PIXELS_FOR_THRESHOLD = 2_000_000


def _normal_batches(dataset: Dataset, batch_size: int):
    for batch in loader_for(dataset, batch_size):
        keep = batch["label"] == 0
        if keep.any():
            yield {k: (v[keep] if torch.is_tensor(v) else [x for x, m in zip(v, keep) if m]) for k, v in batch.items()}


@torch.no_grad()
def fit_base_statistics(model: DRDC, dataset: Dataset, batch_size: int, device) -> None:
    """Mean and std of the base map over the normal validation images, then (from the same maps) the
    refinement cascade's threshold."""
    total, total_sq, count = 0.0, 0.0, 0
    cascade = model.uses_refiner and model.cfg.refiner.budget.skip_quantile > 0
    base_maps = []
    for batch in _normal_batches(dataset, batch_size):
        images = batch["image"].to(device)
        feats, stages = model.backbone.extract(images)
        base_map = model.base_map(images, feats, batch["category_index"].to(device), stages)
        if cascade:
            base_maps.append(base_map)
        base_map = base_map.double()
        total += base_map.sum().item()
        total_sq += (base_map**2).sum().item()
        count += base_map.numel()
    if count == 0:
        raise DatasetError(
            "the validation split has no normal images to calibrate on: add normal training images "
            "or raise data.val_fraction"
        )
    mean = total / count
    std = max((total_sq / count - mean**2) ** 0.5, 1e-8)
    model.calibration.base_mean.fill_(mean)
    model.calibration.base_std.fill_(std)
    fit_refinement_cascade(model, base_maps)


@torch.no_grad()
def fit_refinement_cascade(model: DRDC, base_maps: list[torch.Tensor]) -> None:
    """The base score below which an image is not refined: the `refiner.budget.skip_quantile`-quantile of the
    base scores of the normal validation images (their raw base maps, `base_maps`); −inf, refine every image,
    when the quantile is 0."""
    q = model.cfg.refiner.budget.skip_quantile
    skip = model.calibration.refine_skip_score
    if q <= 0 or not model.uses_refiner or not base_maps:
        skip.fill_(float("-inf"))
        return
    scores = [model.base_scores(model.calibration.standardise_base(m)).cpu() for m in base_maps]
    skip.fill_(float(torch.quantile(torch.cat(scores).double(), q)))


@torch.no_grad()
def fit_refinement_statistics(model: DRDC, dataset: Dataset, batch_size: int, device) -> None:
    """Mean and std of the refinement maps over every pixel of the normal validation images, whatever
    `refiner.budget` says: a pixel the budget refines then gets the value the always-refine model gives it
    (window statistics, taken where the base map peaks, standardised defects lower; validation chose this)."""
    if not model.uses_refiner:
        return
    everywhere = copy.copy(model)  # same modules and calibration, no budget
    everywhere.cfg = model.cfg.model_copy(deep=True)
    everywhere.cfg.refiner.budget = RefinementBudget()

    def maps():
        for batch in _normal_batches(dataset, batch_size):
            images = batch["image"].to(device)
            cats = batch["category_index"].to(device)
            _, _, refine_maps, _ = everywhere.raw_maps(images, cats)
            yield refine_maps, cats

    model.calibration.refine.fit(maps())


@torch.no_grad()
def fit_thresholds(model: DRDC, dataset: Dataset, batch_size: int, device, seed: int = 0) -> dict[str, float]:
    scores, labels, pix_scores, pix_labels = [], [], [], []
    rng = np.random.default_rng(seed)
    per_image = max(1, MAX_PIXELS_FOR_THRESHOLD // max(1, len(dataset)))
    for batch, pred in predict_batches(model, dataset, batch_size, device):
        scores.append(pred.image_score.numpy())
        labels.append(batch["label"].numpy())
        maps = pred.anomaly_map.flatten(1).numpy()
        masks = (batch["mask"].flatten(1) > 0).numpy()
        for m, g in zip(maps, masks):  # bounded: a fixed random subset of pixels per image
            idx = rng.choice(m.size, size=min(per_image, m.size), replace=False)
            pix_scores.append(m[idx])
            pix_labels.append(g[idx])
    scores_np, labels_np = np.concatenate(scores), np.concatenate(labels)
    cal = model.calibration
    if labels_np.min() == labels_np.max():  # no anomalies in validation: highest normal score (anomalib's fallback)
        image_f1, image_t = float("nan"), float(scores_np.max())
    else:
        image_f1, image_t = f1_max_threshold(scores_np, labels_np)
    pix_s, pix_l = np.concatenate(pix_scores), np.concatenate(pix_labels)
    if pix_l.any() and not pix_l.all():
        pixel_f1, pixel_t = f1_max_threshold(pix_s, pix_l.astype(np.int64))
    else:
        pixel_f1, pixel_t = float("nan"), float(pix_s.max())
    cal.image_threshold.fill_(float(image_t))
    cal.pixel_threshold.fill_(float(pixel_t))
    cal.image_min.fill_(float(scores_np.min()))
    cal.image_max.fill_(float(scores_np.max()))
    return {"val_image_f1": float(image_f1), "val_pixel_f1": float(pixel_f1)}


def calibrate(model: DRDC, dataset: Dataset, batch_size: int, device, on_pass=None) -> dict[str, float]:
    """All statistics in dependency order: base → refinement (guided by the base) → thresholds.

    `on_pass(name)` is told before each pass over the validation images (each can take minutes on a CPU)."""
    say = on_pass or (lambda name: None)
    model.eval()
    say(f"base-map statistics (pass 1/3 over {len(dataset)} validation images)")
    fit_base_statistics(model, dataset, batch_size, device)
    if model.uses_refiner:
        say("refinement-map statistics (pass 2/3)")
    fit_refinement_statistics(model, dataset, batch_size, device)
    say("image and pixel thresholds (pass 3/3)")
    return fit_thresholds(model, dataset, batch_size, device)
