"""Which training stages a sweep trains per trial, and the base branch it trains once for all of them.

Every swept key belongs to a stage (`dcad.train.shared_stages.stage_of`). With no base-stage key swept,
every trial has the same base branch: `train_shared_base` trains it once, before the trials start, as one
Ray task holding the CPUs the concurrent trials would hold, and stores it with the feature cache in the
sweep's `stages/`. Trials that also agree on every refiner key share one refiner training; the others
only re-score (calibrate and evaluate) the trained weights. `StagePlan` counts this for `--dry-run`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from dcad.platform.sweep.spec import CategoricalParam, SweepSpec, TRIAL_CPUS
from dcad.train.shared_stages import stage_of

Log = Callable[[str], None]


@dataclass(frozen=True)
class StagePlan:
    num_trials: int
    base_keys: tuple[str, ...]
    refiner_keys: tuple[str, ...]
    rescore_keys: tuple[str, ...]
    refiner_configs: int | None  # distinct refiner configurations when every refiner key is categorical

    @classmethod
    def of(cls, spec: SweepSpec) -> "StagePlan":
        by_stage: dict[str, list[str]] = {"base": [], "refiner": [], "rescore": []}
        for key in spec.search_space:
            stage = stage_of(key)
            by_stage["base" if stage == "features" else stage].append(key)
        refiner = by_stage["refiner"]
        params = [spec.search_space[k] for k in refiner]
        configs = math.prod(len(p.choices) for p in params) if all(isinstance(p, CategoricalParam) for p in params) else None
        return cls(spec.num_trials, tuple(by_stage["base"]), tuple(refiner), tuple(by_stage["rescore"]), configs)

    @property
    def shared_base(self) -> bool:
        return not self.base_keys

    @property
    def base_trainings(self) -> int:
        return 1 if self.shared_base else self.num_trials

    @property
    def refiner_trainings(self) -> int:
        if self.base_keys or self.refiner_configs is None:
            return self.num_trials
        return min(self.num_trials, self.refiner_configs)

    @property
    def rescorings(self) -> int:
        return self.num_trials - self.refiner_trainings

    def lines(self) -> list[str]:
        base = ("1 base training, shared by every trial (no swept key changes the base branch)" if self.shared_base
                else f"up to {self.num_trials} base trainings (swept: {', '.join(self.base_keys)})")
        refiner = f"up to {self.refiner_trainings} refiner training(s)"
        if self.refiner_keys and self.refiner_configs is not None and not self.base_keys:
            refiner += f" (one per value of {', '.join(self.refiner_keys)})"
        rescore = f"at least {self.rescorings} trial(s) only re-scoring trained weights" if self.rescorings else "no re-scoring only"
        return [f"stages: {base}; {refiner}; {rescore}"]


def train_shared_base(spec: SweepSpec, sweep_root: str, digest: str, concurrency: int, log: Log) -> list[float] | None:
    """Train the one base branch (and feature cache) all trials share, unless the sweep's store has it;
    the training's wall-clock [start, end] (None when it was there already)."""
    import ray

    from dcad.platform.stage_store import StageStore
    from dcad.platform.storage import resolve_storage

    cfg = spec.base_config()
    store = StageStore(resolve_storage(sweep_root, Path(sweep_root)), digest)
    if store.has("base", cfg):
        log("shared base branch: already trained in this sweep's stages/, reusing it")
        return None
    r = spec.resources
    cpus = base_task_cpus(concurrency * (r.workers * r.cpus_per_worker + TRIAL_CPUS), r.gpus_per_worker or 0)
    gpus = r.gpus_per_worker if r.gpus_per_worker else 0
    log(f"shared base branch: training it once for all trials ({cfg.train.base.epochs} epochs, {cpus:g} CPU)")
    task = ray.remote(num_cpus=cpus, num_gpus=gpus, max_retries=0)(_train_base_task)
    return ray.get(task.remote(cfg.model_dump(mode="json"), str(spec.dataset_path()), sweep_root, digest, max(1, math.ceil(cpus))))


def base_task_cpus(wanted: float, gpus: float) -> float:
    """The trials' CPUs for the one task that trains the shared base, but no more than one node has: a task
    runs on one node, and a request no node can hold would wait forever (three 1-CPU nodes, 1.01 wanted)."""
    from dcad.platform.ray_cluster import cluster_nodes

    nodes = [n for n in cluster_nodes() if n.gpus + 1e-9 >= gpus]
    largest = max((n.cpus for n in nodes), default=wanted)
    return min(wanted, largest) if largest > 0 else wanted


def _train_base_task(cfg_data: dict, data_root: str, sweep_root: str, digest: str, threads: int) -> list[float]:
    import time

    import torch

    from dcad.core.config import DCADConfig
    from dcad.core.data import build_splits
    from dcad.platform.stage_store import StageStore
    from dcad.platform.storage import resolve_storage
    from dcad.train.pipeline import TrainHooks, resolve_device, train_base

    torch.set_num_threads(threads)
    cfg = DCADConfig.from_dict(cfg_data, "sweep base")
    store = StageStore(resolve_storage(sweep_root, Path(sweep_root)), digest)
    started, wall_start = time.perf_counter(), time.time()

    def on_epoch(report) -> None:
        loss = report.metrics.get("train_loss", float("nan"))
        print(f"dcad: shared base branch: epoch {report.epoch}/{report.epochs}, train loss {loss:.4f}", flush=True)

    hooks = TrainHooks(on_epoch=on_epoch, on_shared=lambda stage, result: store.publish(stage, cfg, result))
    splits = build_splits(Path(data_root), cfg.data)
    train_base(cfg, splits, device=resolve_device("auto"), hooks=hooks, start=None)
    print(f"dcad: shared base branch: trained in {time.perf_counter() - started:.0f} s", flush=True)
    return [wall_start, time.time()]
