"""Train a DRDC model end to end on one process: prototypes → base stage → refiner stage → calibration.

`start` (a `StageStart`) lets a training begin from stages an earlier one produced (a sweep shares them:
`dcad.train.shared_stages`); `train_base` trains only the base stage.

Each stage runs through `fit_stage` and is checkpointed at every epoch under `checkpoint_dir`, so an
interrupted run resumes where it stopped (`resume=True`). A distributed runner (`dcad.platform.ray_train`)
calls `train_drdc` on every worker with a `TrainRole`: all ranks train (the role's `wrap_module` wraps the
trained module in DDP); only the chief validates, writes checkpoints and calibrates.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from dcad.core.config import DCADConfig
from dcad.core.data import Splits
from dcad.core.inference import loader_for
from dcad.core.metrics import AnomalyEvaluator
from dcad.core.model.drdc import DRDC
from dcad.core.model.fusion import gaussian_blur, image_score
from dcad.train.base_stage import BaseStage
from dcad.train.calibrate import calibrate, fit_base_statistics
from dcad.train.checkpoint import load_checkpoint, save_checkpoint
from dcad.train.features import FeatureCache, compute_features
from dcad.train.loop import fit_stage, seed_everything
from dcad.train.refiner_stage import RefinerStage
from dcad.train.shared_stages import TrainedBase, TrainedWeights, load_into
from dcad.train.stage import EpochCallback, EpochReport

PhaseCallback = Callable[[str], None]
SharedCallback = Callable[[str, object], None]  # ("features", FeatureCache) or ("base", TrainedBase)
ModuleWrapper = Callable[[nn.Module], nn.Module]


@dataclass(frozen=True)
class TrainRole:
    """This process's part in a training. In-process training is the default: one chief, no wrapper."""

    chief: bool = True  # validates, writes checkpoints under checkpoint_dir, calibrates
    wrap_module: ModuleWrapper | None = None  # e.g. DistributedDataParallel, applied by `fit_stage`


@dataclass
class TrainHooks:
    on_epoch: EpochCallback | None = None
    on_phase: PhaseCallback | None = None
    on_shared: SharedCallback | None = None  # told each result another training could start from
    history: list[dict] = field(default_factory=list)

    def phase(self, name: str) -> None:
        if self.on_phase:
            self.on_phase(name)

    def shared(self, stage: str, result) -> None:
        if self.on_shared:
            self.on_shared(stage, result)


@torch.no_grad()
def stack_images(dataset, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """All images of a (small) dataset as uint8 [N,3,H,W] plus category indices."""
    images, cats = [], []
    for batch in loader_for(dataset, batch_size):
        images.append((batch["image"] * 255).round().to(torch.uint8))
        cats.append(batch["category_index"])
    return torch.cat(images), torch.cat(cats)


class _ValidationSet:
    """Validation images held in memory (the split is small) with labels and masks."""

    def __init__(self, model: DRDC, dataset, batch_size: int, device, max_images: int) -> None:
        self.batches = []
        n = 0
        for batch in loader_for(dataset, batch_size):
            self.batches.append(batch)
            n += len(batch["label"])
            if n >= max_images:
                break
        self.model, self.device = model, device

    @torch.no_grad()
    def base_metrics(self, base_module) -> dict[str, float]:
        ev, losses = AnomalyEvaluator(), []
        cfg = self.model.cfg
        for b in self.batches:
            feats = self.model.backbone(b["image"].to(self.device))
            recon = base_module(feats)
            normal = b["label"].to(self.device) == 0
            if normal.any():
                losses.append(((recon - feats) ** 2)[normal].mean().item())
            amap = gaussian_blur(self.model.base.anomaly_map(feats, recon, self.model.image_size), cfg.fusion.blur_sigma)
            ev.update(image_score(amap, cfg.fusion.pool_kernel), b["label"], amap, b["mask"], list(b["category"]))
        return _val_metrics(ev.compute(), losses)

    @torch.no_grad()
    def full_metrics(self, dataset, batch_size, recalibrate: bool = True) -> dict[str, float]:
        if recalibrate:
            calibrate(self.model, dataset, batch_size, self.device)
        ev = AnomalyEvaluator()
        for b in self.batches:
            pred = self.model(b["image"].to(self.device), b["category_index"].to(self.device))
            ev.update(pred.image_score, b["label"], pred.anomaly_map, b["mask"], list(b["category"]))
        return _val_metrics(ev.compute(), [])


def _val_metrics(result: dict, losses: list[float]) -> dict[str, float]:
    mean = result["mean"]
    out = {f"val_{k}": float(mean[k]) for k in ("image_auroc", "pixel_auroc", "aupro")}
    if losses:
        out["val_loss"] = float(np.mean(losses))
    return out


def _checkpointing(checkpoint_dir: Path | None, hooks: TrainHooks) -> EpochCallback:
    def on_epoch(report: EpochReport) -> None:
        if checkpoint_dir is not None:
            save_checkpoint(report.checkpoint(), checkpoint_dir / f"{report.stage}.pt")
        hooks.history.append({"stage": report.stage, "epoch": report.epoch, **report.metrics})
        if hooks.on_epoch:
            hooks.on_epoch(report)

    return on_epoch


def _resume_state(checkpoint_dir: Path | None, stage: str, resume: bool) -> dict | None:
    if not resume or checkpoint_dir is None:
        return None
    path = checkpoint_dir / f"{stage}.pt"
    return load_checkpoint(path) if path.exists() else None


def _run_stage(stage, stage_cfg, cfg: DCADConfig, device, checkpoint_dir, resume, hooks, role: TrainRole) -> None:
    state = _resume_state(checkpoint_dir, stage.name, resume)
    if state is not None and state["epoch"] >= stage_cfg.epochs:
        stage.module().load_state_dict(state["model"])
        hooks.phase(f"{stage.name}: finished earlier (epoch {state['epoch']}), reusing its checkpoint")
        return
    if state is not None:
        hooks.phase(f"{stage.name}: resuming from epoch {state['epoch']}")
    fit_stage(
        stage,
        stage_cfg,
        device,
        seed=cfg.train.seed,
        amp=cfg.train.amp,
        on_epoch=_checkpointing(checkpoint_dir if role.chief else None, hooks),
        resume=state,
        wrap_module=role.wrap_module,
    )


@dataclass
class StageStart:
    """Earlier results to start from (`dcad.train.shared_stages`): each one skips the stages it holds."""

    features: FeatureCache | None = None  # skips the backbone pass over the training images
    base: TrainedBase | None = None  # skips it and the base stage
    weights: TrainedWeights | None = None  # skips every stage: only calibration is left

    @property
    def what(self) -> str:
        if self.weights is not None:
            return "trained weights (calibration only)"
        if self.base is not None:
            return "a trained base branch"
        return "a feature cache" if self.features is not None else "nothing"


def train_drdc(
    cfg: DCADConfig,
    splits: Splits,
    *,
    device: torch.device,
    checkpoint_dir: Path | None = None,
    resume: bool = False,
    hooks: TrainHooks | None = None,
    role: TrainRole | None = None,
    start: StageStart | None = None,
) -> tuple[DRDC, dict[str, float]]:
    """Train both stages (from `start` where given) and calibrate on validation; the model and its validation metrics.

    A non-chief `role` trains only: its model is left uncalibrated and its metrics are empty.
    """
    hooks = hooks or TrainHooks()
    role = role or TrainRole()
    start = start or StageStart()
    seed_everything(cfg.train.seed)
    if checkpoint_dir is not None and role.chief:
        checkpoint_dir.mkdir(parents=True, exist_ok=True)
    bs = cfg.train.eval_batch_size
    model = DRDC(cfg, splits.categories).to(device)
    val = _ValidationSet(model, splits.val, bs, device, cfg.train.val_max_images) if role.chief else None
    if start.weights is not None:
        hooks.phase("trained weights shared with an earlier training: calibrating only")
        load_into(model, start.weights)
        hooks.history.extend(start.weights.history)
        cache = None
    else:
        cache = _train_base(model, cfg, splits, device, checkpoint_dir, resume, hooks, role, start, val)
    model.eval()
    fit_base_statistics(model, splits.val, bs, device)

    if model.uses_refiner and start.weights is None:
        hooks.phase("refiner")
        images, cats = stack_images(splits.train, bs)
        base_maps = _standardised_base_maps(model, cache, images, cats, device)
        refiner_stage = RefinerStage(
            model.denoiser,
            model.scheduler,
            cfg.refiner,
            images,
            base_maps,
            cats,
            validate_fn=(lambda _m: val.full_metrics(splits.val, bs)) if val is not None and cfg.train.validate_refiner else None,
        )
        _run_stage(refiner_stage, cfg.train.refiner, cfg, device, checkpoint_dir, resume, hooks, role)

    if not role.chief:
        return model, {}
    model.eval()
    val_metrics = calibrate(model, splits.val, bs, device, on_pass=lambda name: hooks.phase(f"calibration: {name}"))
    hooks.phase("validation metrics of the calibrated model")
    val_metrics.update(val.full_metrics(splits.val, bs, recalibrate=False))
    return model, val_metrics


def train_base(cfg: DCADConfig, splits: Splits, *, device: torch.device, hooks: TrainHooks | None = None,
               start: StageStart | None = None) -> TrainedBase:
    """Only the base stage (from `start.features` when given): what trainings that differ in later keys share."""
    hooks = hooks or TrainHooks()
    trained: dict[str, object] = {}
    told = hooks.on_shared

    def keep(stage: str, result) -> None:
        trained[stage] = result
        if told:
            told(stage, result)

    hooks.on_shared = keep
    seed_everything(cfg.train.seed)
    model = DRDC(cfg, splits.categories).to(device)
    val = _ValidationSet(model, splits.val, cfg.train.eval_batch_size, device, cfg.train.val_max_images)
    _train_base(model, cfg, splits, device, None, False, hooks, TrainRole(), start or StageStart(), val)
    hooks.on_shared = told
    return trained["base"]


def _train_base(model: DRDC, cfg: DCADConfig, splits: Splits, device, checkpoint_dir, resume, hooks: TrainHooks,
                role: TrainRole, start: StageStart, val) -> FeatureCache:
    """Prototypes and the base branch (trained, or taken from `start`); the feature cache of the training set."""
    bs = cfg.train.eval_batch_size
    if start.base is not None:
        hooks.phase("base branch shared with an earlier training")
        load_into(model, start.base)
        hooks.history.extend(start.base.history)
        return start.base.features
    if start.features is not None:
        hooks.phase("prototypes (feature cache shared with an earlier training)")
        cache = start.features
    else:
        hooks.phase("prototypes and feature cache")
        cache = compute_features(model.backbone, splits.train, bs, device)
        hooks.shared("features", cache)
    model.prototypes.copy_(cache.category_prototypes(len(model.categories)).to(device))
    if model.memory is not None:
        hooks.phase("patch memory (coreset of each category's training patches)")
        fit_memory(model, splits.train, bs, device)
        hooks.shared("base", TrainedBase(None, model.prototypes.detach().clone(), cache, [], memory=model.memory.state_dict()))
        return cache
    hooks.phase("base branch")
    # validation scores the plain module (never a DDP wrapper, whose forward would wait for the other ranks)
    base_validate = (lambda _module: val.base_metrics(model.base)) if val is not None else None
    base_stage = BaseStage(model.base, cache, validate_fn=base_validate)
    _run_stage(base_stage, cfg.train.base, cfg, device, checkpoint_dir, resume, hooks, role)
    history = [h for h in hooks.history if h.get("stage") == "base"]
    hooks.shared("base", TrainedBase(model.base.state_dict(), model.prototypes.detach().clone(), cache, history))
    return cache


@torch.no_grad()
def fit_memory(model: DRDC, dataset, batch_size: int, device) -> None:
    """The patch memory's coreset of each category's (normal) training patches, one category at a time."""
    for category in range(len(model.categories)):
        feats = []
        for batch in loader_for(dataset, batch_size):
            keep = batch["category_index"] == category
            if keep.any():
                images = batch["image"][keep].to(device)
                feats.append(model.memory.features(model.backbone.stages(images)))
        if feats:
            model.memory.add_category(category, torch.cat(feats))


@torch.no_grad()
def _standardised_base_maps(model: DRDC, cache, images: torch.Tensor, cats: torch.Tensor, device) -> torch.Tensor:
    """Base maps of the training images (guidance channel of the denoiser), at image resolution; `images` are the
    uint8 training images in the cache's order."""
    maps = []
    for start in range(0, len(cache), 64):
        feats = cache.features[start : start + 64].to(device).float()
        batch = images[start : start + 64].to(device).float() / 255.0
        base = model.base_map(batch, feats, cats[start : start + 64].to(device))
        maps.append(model.calibration.standardise_base(base).cpu())
    return torch.cat(maps)
