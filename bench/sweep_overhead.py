"""Sweep overhead: the share of a sweep's wall time not spent training or evaluating models.

Runs a sweep spec (default `sweeps/quickstart.yaml`) end to end on a local Ray instance (or
`--address`), with its storage and MLflow store in a temporary directory, and reads every result the
trials reported (`STORAGE/NAME/tune/trial_*/result.json`). Busy time is the union of

    shared base   the one base-branch training the sweep shares between its trials (when it has one)
    training      each trial's `train_drdc` (its stages, or only calibration when it re-scores shared
                  weights), from `train_start` to `train_end` in its last result; for a multi-worker trial,
                  from its first epoch (report time minus `epoch_seconds`) to its last report
    evaluation    from the inference-timing pass on the validation images to the end of the test evaluation

and everything else is overhead: Ray start, Tune and Optuna bookkeeping, trial start-up, data loading,
stage downloads, checkpoint copies, MLflow logging (model included), plots and registration.
Also reported: trials per hour (finished trials over the wall time). Target: overhead share ≤ 20 %.

    python bench/sweep_overhead.py [--spec sweeps/quickstart.yaml] [--address ADDR] [--num-trials N] [--out FILE]
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
    if done and "train_start" in done[-1]:
        d = done[-1]
        spans.append((d["train_start"], d["train_end"]))
        info["train_busy_s"] = d["train_end"] - d["train_start"]
        info["started_from"] = d.get("started_from")
    elif train:
        first = train[0]
        start = first["report_time"] - float(first.get("epoch_seconds") or 0.0)
        spans.append((start, max(r["report_time"] for r in train)))
        info["train_busy_s"] = spans[-1][1] - spans[-1][0]
    if done:
        d = done[-1]
        spans.append((d["infer_start"], d["eval_end"]))
        info["eval_busy_s"] = d["eval_end"] - d["infer_start"]
        info["trial_fit_s"] = d["fit_end"] - d["fit_start"]
        info["trial_fixed_s"] = info["trial_fit_s"] - info.get("train_busy_s", 0.0)
        info["timeline"] = {k: d[k] for k in ("fit_start", "train_start", "train_end", "infer_start", "eval_end", "report_time") if k in d}
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
        for info in per_trial.values():  # seconds since the sweep started
            info["timeline"] = {k: round(v - started, 2) for k, v in info.get("timeline", {}).items()}
        shared = result.stage_seconds.get("shared_base")
        if shared:
            spans.append(tuple(shared))
    busy = union_length(spans)
    finished = sum(t.status == "finished" for t in result.trials)
    figures = {
        "spec": args.spec,
        "num_trials": spec.num_trials,
        "max_concurrent": spec.max_concurrent,
        "cpus": os.cpu_count(),
        "wall_s": round(wall, 1),
        "sweep_fit_s": round(result.wall_seconds, 1),
        "busy_s": round(busy, 1),
        "overhead_share": round(1 - busy / wall, 3),
        "trials_per_hour": round(finished * 3600 / wall, 1),
        "shared_base_s": round(shared[1] - shared[0], 1) if shared else None,
        "shared_base_span": [round(t - started, 2) for t in shared] if shared else None,
        "pareto_front": len(result.pareto),
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
