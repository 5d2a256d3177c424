"""Sweep overhead: the share of a sweep's wall time not spent inside trial training and evaluation.

Runs a sweep spec (default `sweeps/quickstart.yaml`) end to end on a local Ray instance (or
`--address`), with its storage and MLflow store in a temporary directory, and reads every result the
trials reported (`STORAGE/NAME/tune/trial_*/result.json`). Busy time is the union over trials of

    training    from the start of the first epoch (its report time minus `epoch_seconds`) to the last
                report of the Ray Train run (the final checkpoint, after calibration)
    evaluation  from the inference-timing pass on the validation images to the end of the test evaluation

and everything else is overhead: Ray start, Tune and Optuna bookkeeping, each trial's TorchTrainer start
and teardown, the workers' data loading and feature cache, checkpoint uploads, MLflow logging (model
included), plots and registration. Target: overhead share ≤ 20 %.

    python bench/sweep_overhead.py [--spec sweeps/quickstart.yaml] [--address ADDR] [--num-trials N]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results" / "sweep_overhead.json"
TARGET = 0.20


def read_results(tune_dir: Path) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for path in sorted(tune_dir.glob("trial_*/result.json")):
        out[path.parent.name.removeprefix("trial_")] = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return out


def busy_intervals(results: list[dict]) -> tuple[list[tuple[float, float]], dict]:
    train = [r for r in results if "report_time" in r and r.get("trial_done") == 0.0]
    done = [r for r in results if r.get("trial_done") == 1.0]
    spans: list[tuple[float, float]] = []
    info: dict = {"epochs_reported": len(train), "finished": bool(done)}
    if train:
        first = train[0]
        start = first["report_time"] - float(first.get("epoch_seconds") or 0.0)
        spans.append((start, max(r["report_time"] for r in train)))
        info["train_busy_s"] = spans[-1][1] - spans[-1][0]
    if done:
        d = done[-1]
        spans.append((d["infer_start"], d["eval_end"]))
        info["eval_busy_s"] = d["eval_end"] - d["infer_start"]
        info["trial_fit_s"] = d["fit_end"] - d["fit_start"]
        info["trainer_fixed_s"] = info["trial_fit_s"] - info.get("train_busy_s", 0.0)
    return spans, info


def union_length(spans: list[tuple[float, float]]) -> float:
    total, end = 0.0, float("-inf")
    for a, b in sorted(spans):
        if b <= end:
            continue
        total += b - max(a, end)
        end = b
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", default="sweeps/quickstart.yaml")
    parser.add_argument("--address", default=None)
    parser.add_argument("--num-trials", type=int, default=None)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

    from dcad.platform.sweep import load_sweep_spec, run_sweep

    spec = load_sweep_spec(args.spec)
    with tempfile.TemporaryDirectory(prefix="dcad-bench-sweep-") as tmp:
        changes = {"storage": str(Path(tmp) / "sweeps"), "tracking_uri": f"sqlite:///{Path(tmp) / 'mlflow.db'}"}
        if args.num_trials:
            changes["num_trials"] = args.num_trials
        spec = spec.model_copy(update=changes)
        started = time.time()
        result = run_sweep(spec, address=args.address, log=lambda m: print(f"  {m}", flush=True))
        wall = time.time() - started
        per_trial = {}
        spans: list[tuple[float, float]] = []
        for trial_id, results in read_results(Path(tmp) / "sweeps" / spec.name / "tune").items():
            trial_spans, info = busy_intervals(results)
            spans += trial_spans
            per_trial[trial_id] = info
    busy = union_length(spans)
    figures = {
        "spec": args.spec,
        "num_trials": spec.num_trials,
        "max_concurrent": spec.max_concurrent,
        "cpus": os.cpu_count(),
        "wall_s": round(wall, 1),
        "sweep_fit_s": round(result.wall_seconds, 1),
        "busy_s": round(busy, 1),
        "overhead_share": round(1 - busy / wall, 3),
        "target": TARGET,
        "meets_target": 1 - busy / wall <= TARGET,
        "trials": {s: sum(t.status == s for t in result.trials) for s in ("finished", "stopped", "failed", "incomplete")},
        "per_trial": per_trial,
        "best_trial": result.best_trial.objectives if result.best_trial else None,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(figures, indent=2))
    print(json.dumps({k: v for k, v in figures.items() if k != "per_trial"}, indent=2))


if __name__ == "__main__":
    main()
