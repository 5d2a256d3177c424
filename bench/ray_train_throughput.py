"""Ray Train throughput of the DRDC training loop on this machine: 1 vs 2 workers, and the fixed cost of a run.

For each worker count N the same global batch is split over N workers (per-worker batch = global / N)
and the machine's CPUs are split between them (`--cpus-per-worker = CPUS / N`). Throughput is training
images per second of each stage (per-epoch training time measured inside the loop, without validation;
median and best epoch):
base = cached feature maps per second, refiner = image crops per second. The in-process run (no Ray)
is the reference. The fixed overhead of a Ray training is (a) starting a local Ray instance and (b) one
`TorchTrainer.fit()` of a function that only reports once (worker group start, process group set-up,
checkpoint bookkeeping, teardown); the rest of a short run's wall time is (c) the per-worker set-up of
dcad itself (dataset, backbone features), also reported.

    python bench/ray_train_throughput.py           # writes bench/results/ray_train.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results" / "ray_train.json"
GLOBAL_BATCH = {"base": 16, "refiner": 8}


def build_config(iters: dict[str, int], epochs: dict[str, int], workers: int):
    from dcad.core.config import load_config

    overrides = {"train.validate_refiner": False, "train.val_max_images": 8}
    for stage in ("base", "refiner"):
        overrides[f"train.{stage}.epochs"] = epochs[stage]
        overrides[f"train.{stage}.iters_per_epoch"] = iters[stage]
        overrides[f"train.{stage}.batch_size"] = GLOBAL_BATCH[stage] // workers
    return load_config(profile="tiny", overrides=overrides)


def images_per_second(history: list[dict], cfg, workers: int) -> dict[str, dict[str, float]]:
    """Per stage: (iterations × per-worker batch × workers) / training seconds, median and best over epochs.

    The best epoch is the least disturbed by other load on a shared machine; the median is the typical one.
    """
    out = {}
    for stage in ("base", "refiner"):
        seconds = [e["epoch_seconds"] for e in history if e["stage"] == stage and e.get("epoch_seconds")]
        stage_cfg = getattr(cfg.train, stage)
        images = stage_cfg.iters_per_epoch * stage_cfg.batch_size * workers
        if seconds:
            out[stage] = {"median": round(images / statistics.median(seconds), 2), "best": round(images / min(seconds), 2)}
    return out


def in_process(data: Path, iters, epochs) -> dict:
    from dcad.core.data import build_splits
    from dcad.train.pipeline import TrainHooks, train_drdc

    cfg = build_config(iters, epochs, 1)
    history: list[dict] = []

    def on_epoch(report) -> None:
        history.append({"stage": report.stage, "epoch_seconds": report.extra["seconds"]})

    started = time.perf_counter()
    train_drdc(cfg, build_splits(data, cfg.data), device="cpu", hooks=TrainHooks(on_epoch=on_epoch))
    return {"images_per_s": images_per_second(history, cfg, 1), "wall_s": round(time.perf_counter() - started, 1)}


def empty_fit_seconds(workers: int, cpus: float, storage: Path) -> float:
    """Wall time of a TorchTrainer run whose workers only report once: the fixed cost of a Ray training."""
    import ray.train
    from ray.train.torch import TorchTrainer

    def report_once(_config) -> None:
        ray.train.report({"done": 1})

    trainer = TorchTrainer(
        report_once,
        scaling_config=ray.train.ScalingConfig(num_workers=workers, resources_per_worker={"CPU": cpus}),
        run_config=ray.train.RunConfig(name=f"empty-{workers}", storage_path=str(storage)),
    )
    started = time.perf_counter()
    trainer.fit()
    return round(time.perf_counter() - started, 1)


def on_ray(data: Path, iters, epochs, workers: int, cpus: float, output: Path) -> dict:
    from dcad.platform.ray_train import RayTrainOptions, plan_run, train_on_ray

    cfg = build_config(iters, epochs, workers)
    plan = plan_run(RayTrainOptions(workers, cpus_per_worker=cpus, name=f"bench-{workers}"), output)
    started = time.perf_counter()
    outcome = train_on_ray(cfg, data, plan, log=lambda m: print(f"  {m}", flush=True))
    wall = time.perf_counter() - started
    train_s = sum(e.get("epoch_seconds") or 0.0 for e in outcome.history)
    return {
        "workers": workers,
        "cpus_per_worker": cpus,
        "per_worker_batch": {s: GLOBAL_BATCH[s] // workers for s in GLOBAL_BATCH},
        "images_per_s": images_per_second(outcome.history, cfg, workers),
        "fit_wall_s": round(wall, 1),
        "training_s": round(train_s, 1),
        "not_training_s": round(wall - train_s, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-iters", type=int, default=30)
    parser.add_argument("--refiner-iters", type=int, default=10)
    parser.add_argument("--epochs", type=int, default=3, help="Epochs per stage (the first includes warm-up).")
    parser.add_argument("--cpus", type=float, default=float(os.cpu_count() or 2), help="CPUs of the local Ray instance.")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    iters = {"base": args.base_iters, "refiner": args.refiner_iters}
    epochs = {"base": args.epochs, "refiner": args.epochs}

    from dcad.core.data import CATEGORIES, synthesize

    work = Path(tempfile.mkdtemp(prefix="dcad-bench-ray-"))
    data = work / "data"
    synthesize(data, seed=0, size=64, categories=CATEGORIES[:2], n_train=12, n_test=4)
    result: dict = {"load_avg_start": [round(x, 2) for x in os.getloadavg()], "cpus": args.cpus, "iters": iters, "epochs": epochs,
                    "global_batch": GLOBAL_BATCH}
    print("in-process reference", flush=True)
    result["in_process"] = in_process(data, iters, epochs)

    import ray

    started = time.perf_counter()
    ray.init(num_cpus=int(args.cpus), include_dashboard=False, log_to_driver=False)
    overhead = {"ray_init_s": round(time.perf_counter() - started, 1), "empty_fit_s": {}}
    runs = {}
    for workers in (1, 2):
        cpus = args.cpus / workers
        print(f"{workers} worker(s), {cpus:g} CPU each", flush=True)
        overhead["empty_fit_s"][str(workers)] = empty_fit_seconds(workers, cpus, work / "empty")
        runs[str(workers)] = on_ray(data, iters, epochs, workers, cpus, work / f"out-{workers}")
    ray.shutdown()
    result.update({"ray": runs, "fixed_overhead": overhead, "load_avg_end": [round(x, 2) for x in os.getloadavg()]})
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
