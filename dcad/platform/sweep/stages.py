"""The stages a sweep's trials share: what `--dry-run` counts, and the base branch trained once before the trials."""

from __future__ import annotations

import math
from pathlib import Path

from dcad.platform.sweep.reporting import Log
from dcad.platform.sweep.spec import TRIAL_CPUS, CategoricalParam, SweepSpec


def stage_plan(spec: SweepSpec) -> str:
    """The trainings the trials need at most: trials that agree on every refiner key share one refiner training,
    the others only re-score (calibrate and evaluate) trained weights."""
    from dcad.train.shared_stages import stage_of

    keys: dict[str, list[str]] = {"base": [], "refiner": [], "rescore": []}
    for key in spec.search_space:
        stage = stage_of(key)
        keys["base" if stage == "features" else stage].append(key)
    params = [spec.search_space[k] for k in keys["refiner"]]
    configs = math.prod(len(p.choices) for p in params) if all(isinstance(p, CategoricalParam) for p in params) else None
    n = spec.num_trials
    refiners = n if keys["base"] or configs is None else min(n, configs)
    base = (f"up to {n} base trainings (swept: {', '.join(keys['base'])})" if keys["base"] else
            "1 base training, shared by every trial (no swept key changes the base branch)")
    refiner = f"up to {refiners} refiner training(s)"
    if keys["refiner"] and configs is not None and not keys["base"]:
        refiner += f" (one per value of {', '.join(keys['refiner'])})"
    rescore = f"at least {n - refiners} trial(s) only re-scoring trained weights" if n > refiners else "no re-scoring only"
    return f"stages: {base}; {refiner}; {rescore}"


def train_shared_base(spec: SweepSpec, sweep_root: str, digest: str, concurrency: int, log: Log) -> list[float] | None:
    """Train the base branch (and feature cache) all trials share as one Ray task holding the CPUs the concurrent
    trials would hold, unless the sweep's `stages/` has it; its wall-clock [start, end] (None: it was there)."""
    import ray

    from dcad.platform.ray_worker import stage_store

    cfg = spec.base_config()
    if stage_store(sweep_root, digest).has("base", cfg):
        log("shared base branch: already trained in this sweep's stages/, reusing it")
        return None
    r = spec.resources
    gpus = r.gpus_per_worker or 0
    cpus = base_task_cpus(concurrency * (r.workers * r.cpus_per_worker + TRIAL_CPUS), gpus)
    log(f"shared base branch: training it once for all trials ({cfg.base_epochs} epochs, {cpus:g} CPU)")
    task = ray.remote(num_cpus=cpus, num_gpus=gpus, max_retries=0)(_train_base_task)
    return ray.get(task.remote(cfg.model_dump(mode="json"), str(spec.dataset_path()), sweep_root, digest, max(1, math.ceil(cpus))))


def base_task_cpus(wanted: float, gpus: float) -> float:
    """`wanted`, but no more than one node (with `gpus`) has: a task runs on one node, and a request no node can
    hold would wait forever (three 1-CPU nodes, 1.01 wanted)."""
    from dcad.platform.ray_cluster import cluster_nodes

    largest = max((n.cpus for n in cluster_nodes() if n.gpus + 1e-9 >= gpus), default=wanted)
    return min(wanted, largest) if largest > 0 else wanted


def _train_base_task(cfg_data: dict, data_root: str, sweep_root: str, digest: str, threads: int) -> list[float]:
    import time

    import torch

    from dcad.core.config import DCADConfig
    from dcad.core.data import build_splits
    from dcad.core.device import resolve_device
    from dcad.platform.ray_worker import stage_store
    from dcad.train.pipeline import TrainHooks, train_base

    torch.set_num_threads(threads)
    cfg = DCADConfig.from_dict(cfg_data, "sweep base")
    store = stage_store(sweep_root, digest)
    started = time.time()

    def on_epoch(report) -> None:
        loss = report.metrics.get("train_loss", float("nan"))
        print(f"dcad: shared base branch: epoch {report.epoch}/{report.epochs}, train loss {loss:.4f}", flush=True)

    hooks = TrainHooks(on_epoch=on_epoch, on_shared=lambda stage, result: store.publish(stage, cfg, result))
    train_base(cfg, build_splits(Path(data_root), cfg.data), device=resolve_device("auto"), hooks=hooks, start=None)
    print(f"dcad: shared base branch: trained in {time.time() - started:.0f} s", flush=True)
    return [started, time.time()]
