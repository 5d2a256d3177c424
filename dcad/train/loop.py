"""The one training loop every stage runs through (locally or on each Ray Train worker).

AdamW, linear warmup then cosine decay, gradient clipping, bf16 autocast on CUDA, and seeding that
makes an epoch a function of (seed, stage, epoch, rank) alone: its data order, its loss randomness
(the generator handed to `stage.loss`) and the global RNGs (dropout) are all re-seeded at the start
of each epoch. Together with the model, optimizer and scheduler states in a checkpoint, resuming after
epoch k gives bit-identical weights to a straight run (on the same device and software).
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import random
import time
import warnings
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.optim.lr_scheduler import CosineAnnealingLR, LinearLR, LRScheduler, SequentialLR
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler

from dcad.core.config import StageTrainConfig
from dcad.core.errors import DcadError, ModelError, first_line
from dcad.train.stage import EpochCallback, EpochReport, StepCallback, TrainStage, batches_forever


def derive_seed(seed: int, *parts: object) -> int:
    """A stable 63-bit seed from a base seed and labels (Python's `hash` is salted per process)."""
    text = ":".join(str(p) for p in (seed, *parts))
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") >> 1


def warmup_cosine(optimizer: torch.optim.Optimizer, warmup: int, total: int) -> LRScheduler:
    """LR × (step+1)/warmup over the first `warmup` steps, then a cosine decay to 0 at step `total` (torch schedulers)."""
    cosine = CosineAnnealingLR(optimizer, T_max=max(1, total - warmup))
    if warmup == 0:
        return cosine
    ramp = LinearLR(optimizer, start_factor=1.0 / warmup, end_factor=1.0, total_iters=max(warmup - 1, 1))
    return SequentialLR(optimizer, [ramp, cosine], milestones=[warmup])


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators (torch's on every CUDA device too)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def distributed_rank() -> tuple[int, int]:
    """(rank, world size); (0, 1) when torch.distributed is not initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def fit_stage(
    stage: TrainStage,
    cfg: StageTrainConfig,
    device: torch.device,
    *,
    seed: int,
    amp: bool = True,
    on_epoch: EpochCallback | None = None,
    on_step: StepCallback | None = None,
    resume: dict[str, Any] | None = None,
    wrap_module: Callable[[nn.Module], nn.Module] | None = None,
) -> dict[str, Any]:
    """Train `stage` for `cfg.epochs` epochs of `cfg.iters_per_epoch` steps; returns the final checkpoint state.

    `on_step(epoch, step, loss)` uses 1-based epoch and step numbers; `on_epoch` gets an `EpochReport` whose
    `checkpoint()` must be called inside the callback (it snapshots the state at that moment, on CPU).
    """
    device = torch.device(device)
    trainer = _Trainer(stage, cfg, device, seed=seed, amp=amp)
    if resume is not None:
        trainer.restore(resume)
    module = wrap_module(trainer.model) if wrap_module is not None else trainer.model
    for epoch in range(trainer.start_epoch, cfg.epochs):
        metrics, extra = trainer.train_epoch(module, epoch, on_step)
        metrics.update(_validate(stage, module))
        if on_epoch is not None:
            snapshot = _bind_state(trainer, epoch + 1, metrics)
            on_epoch(EpochReport(stage.name, epoch + 1, cfg.epochs, metrics, snapshot, extra))
        trainer.completed = epoch + 1
    return trainer.state(trainer.completed, {})


def _bind_state(trainer: "_Trainer", epoch: int, metrics: dict[str, float]) -> Callable[[], dict[str, Any]]:
    return lambda: trainer.state(epoch, dict(metrics))


def _validate(stage: TrainStage, module: nn.Module) -> dict[str, float]:
    module.eval()
    try:
        with torch.no_grad():
            metrics = stage.validate(module) or {}
    finally:
        module.train()
    return {k: float(v) for k, v in metrics.items()}


class _Trainer:
    """The optimisation state of one `fit_stage` call."""

    def __init__(self, stage: TrainStage, cfg: StageTrainConfig, device: torch.device, *, seed: int, amp: bool) -> None:
        self.stage, self.cfg, self.device, self.seed = stage, cfg, device, seed
        self.autocast = amp and device.type == "cuda"
        self.model = stage.module().to(device)
        self.model.train()
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        if not self.params:
            raise ModelError(f"stage '{stage.name}': the module has no trainable parameters")
        self.optimizer = torch.optim.AdamW(self.params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.scheduler = warmup_cosine(self.optimizer, cfg.warmup_iters, cfg.epochs * cfg.iters_per_epoch)
        self.rank, self.world = distributed_rank()
        self.start_epoch = 0
        self.completed = 0

    # ---- resume / checkpoint -------------------------------------------------------------------------
    def restore(self, state: dict[str, Any]) -> None:
        if state.get("stage") != self.stage.name:
            found = state.get("stage")
            raise ModelError(f"cannot resume stage '{self.stage.name}' from a checkpoint of stage '{found}'")
        try:
            self.model.load_state_dict(_strip_ddp_prefix(state["model"]))
            self.optimizer.load_state_dict(state["optimizer"])
            steps_done = int(state["scheduler"]["last_epoch"])
        except (KeyError, RuntimeError, ValueError) as err:
            raise ModelError(f"checkpoint of stage '{self.stage.name}' does not fit this model ({first_line(err, 200)})") from None
        # the current config defines the schedule: a fresh one, advanced to the checkpoint's step
        self.scheduler = warmup_cosine(self.optimizer, self.cfg.warmup_iters, self.cfg.epochs * self.cfg.iters_per_epoch)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "lr_scheduler.step() before optimizer.step()": no training step here
            for _ in range(steps_done):
                self.scheduler.step()
        if "rng" in state:
            _set_rng_state(state["rng"])
        self.start_epoch = self.completed = int(state["epoch"])

    def state(self, epoch: int, metrics: dict[str, float]) -> dict[str, Any]:
        return {
            "stage": self.stage.name,
            "epoch": epoch,
            "epochs": self.cfg.epochs,
            "seed": self.seed,
            "model": _cpu_copy(_strip_ddp_prefix(self.model.state_dict())),
            "optimizer": _cpu_copy(self.optimizer.state_dict()),
            "scheduler": _cpu_copy(self.scheduler.state_dict()),
            "rng": _rng_state(),
            "config": self.cfg.model_dump(mode="json"),
            "metrics": metrics,
        }

    # ---- one epoch ------------------------------------------------------------------------------------
    def train_epoch(self, module: nn.Module, epoch: int, on_step: StepCallback | None) -> tuple[dict, dict]:
        epoch_seed = derive_seed(self.seed, self.stage.name, epoch, self.rank)
        seed_everything(epoch_seed)
        loss_generator = torch.Generator(device=self.device).manual_seed(derive_seed(epoch_seed, "loss"))
        batches = batches_forever(self._loader(epoch, epoch_seed))
        module.train()
        total, started = 0.0, time.perf_counter()
        for step in range(self.cfg.iters_per_epoch):
            loss = self._step(module, next(batches), loss_generator)
            if not math.isfinite(loss):
                raise DcadError(
                    f"stage '{self.stage.name}': loss became {loss} at epoch {epoch + 1}, step {step + 1} "
                    f"(lower train.{self.stage.name}.lr or add warmup)"
                )
            total += loss
            if on_step is not None:
                on_step(epoch + 1, step + 1, loss)
        seconds = time.perf_counter() - started
        train_loss = self._mean_over_ranks(total / self.cfg.iters_per_epoch)
        metrics = {"train_loss": train_loss, "lr": self.scheduler.get_last_lr()[0]}
        return metrics, {"seconds": seconds, "iters_per_s": self.cfg.iters_per_epoch / max(seconds, 1e-9)}

    def _step(self, module: nn.Module, batch: Any, generator: torch.Generator) -> float:
        self.optimizer.zero_grad(set_to_none=True)
        amp_context = torch.autocast("cuda", dtype=torch.bfloat16) if self.autocast else contextlib.nullcontext()
        with amp_context:
            loss = self.stage.loss(module, _to_device(batch, self.device), generator)
        loss.backward()
        if self.cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.cfg.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        return float(loss.detach())

    def _loader(self, epoch: int, epoch_seed: int) -> DataLoader:
        dataset = self.stage.dataset()
        size = len(dataset)
        if size == 0:
            raise DcadError(f"stage '{self.stage.name}': the training dataset is empty")
        generator = torch.Generator().manual_seed(epoch_seed)
        if self.world > 1:
            sampler = DistributedSampler(
                dataset, self.world, self.rank, shuffle=True, seed=derive_seed(self.seed, self.stage.name) % 2**31
            )
            sampler.set_epoch(epoch)
            size = len(sampler)
        else:
            sampler = RandomSampler(dataset, generator=generator)
        return DataLoader(
            dataset,
            batch_size=self.cfg.batch_size,
            sampler=sampler,
            drop_last=size >= self.cfg.batch_size,
            generator=generator,
            pin_memory=self.device.type == "cuda",
        )

    def _mean_over_ranks(self, value: float) -> float:
        if self.world == 1:
            return value
        tensor = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(tensor)
        return float(tensor.item()) / self.world


# ---- helpers ------------------------------------------------------------------------------------------
def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: _to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(v, device) for v in batch)
    return batch


def _strip_ddp_prefix(state: dict[str, Any]) -> dict[str, Any]:
    return {k.removeprefix("module."): v for k, v in state.items()}


def _cpu_copy(value: Any) -> Any:
    """Deep copy with tensors moved to CPU, so a snapshot does not change as training continues."""
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        return {k: _cpu_copy(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_cpu_copy(v) for v in value)
    return value


def _rng_state() -> dict[str, Any]:
    """Python, NumPy, torch and CUDA RNG states as tensors and plain values (weights-only loadable)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    if "python" in state:
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))
    if "numpy" in state:
        kind, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if "torch" in state:
        torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
