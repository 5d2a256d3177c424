"""What a sweep records: MLflow parent run, trial records, best trial, Pareto front, plots, `challenger` model."""

from __future__ import annotations

import json
import math
import tempfile
import warnings
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable

from dcad.platform.errors import describe
from dcad.platform.leaderboard import pareto_front as front_of
from dcad.platform.sweep.spec import SweepSpec

DONE_KEY = "trial_done"  # 1.0 in a trial's last result once it trained and was evaluated
FLOOR_METRICS = ("val_image_auroc", "val_pixel_auroc")
_NOT_METRICS = {"timestamp", "pid", "training_iteration", "time_this_iter_s", "time_total_s", "time_since_restore",
                "iterations_since_restore", "report_time", "fit_start", "fit_end", "infer_start", "eval_start",
                "eval_end", "train_start", "train_end", DONE_KEY}

Log = Callable[[str], None]


def is_finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass
class TrialRecord:
    trial_id: str
    status: str  # finished | stopped (ASHA) | failed | incomplete (interrupted)
    params: dict[str, Any]
    run_id: str | None = None
    objectives: dict[str, float] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)  # last result: val_*, test_*, timings
    resumed_from_epoch: float = 0.0
    error: str | None = None


@dataclass
class BestTrial:
    trial_id: str
    run_id: str | None
    params: dict[str, Any]
    objectives: dict[str, float]


@dataclass
class SweepResult:
    name: str
    parent_run_id: str | None
    best_trial: BestTrial | None
    registered_version: str | None
    trials: list[TrialRecord]
    pareto: list[str] = field(default_factory=list)  # trial ids on the Pareto front (multi-objective)
    interrupted: bool = False
    wall_seconds: float = 0.0
    storage: str = ""
    study_storage: str = ""
    stage_seconds: dict[str, list[float]] = field(default_factory=dict)  # e.g. shared_base: [start, end] (wall clock)


def trial_record(result, spec: SweepSpec, interrupted: bool = False) -> TrialRecord:
    """A trial's `ray.tune.Result` as the sweep reports it: an unfinished trial is `incomplete` after an
    interruption, else (with results) `stopped` by ASHA."""
    last = dict(result.metrics or {})
    finished = last.get(DONE_KEY) == 1.0
    if result.error is not None:
        status = "failed"
    elif finished:
        status = "finished"
    else:
        status = "stopped" if last and not interrupted else "incomplete"
    metrics = {k: float(v) for k, v in last.items() if k not in _NOT_METRICS and is_finite(v)}
    objectives = {o.metric: metrics[o.metric] for o in spec.objective if o.metric in metrics} if finished else {}
    # the trial id is in every result, and in the trial directory's name (`trial_<id>`)
    trial_id = str(last.get("trial_id") or Path(str(result.path)).name.removeprefix("trial_"))
    return TrialRecord(trial_id, status, dict(result.config or {}), last.get("mlflow_run_id"), objectives, metrics,
                       float(last.get("resumed_from_epoch", 0.0) or 0.0), error_line(result.error))


def error_line(err: BaseException | None) -> str | None:
    """The last line of a failed trial's error (Ray's traceback ends with the exception's own line)."""
    if err is None:
        return None
    lines = str(err).strip().splitlines()
    return (lines[-1].strip() if lines else "failed (see the trial's error.txt)")[:300]


def pareto_front(records: list[TrialRecord], spec: SweepSpec) -> list[TrialRecord]:
    scored = [r for r in records if r.status == "finished" and len(r.objectives) == len(spec.objective)]
    return front_of(scored, spec.objectives, lambda r: r.objectives)


def best_trial(records: list[TrialRecord], spec: SweepSpec) -> BestTrial | None:
    """The finished trial on the Pareto front of the objectives (validation and costs, never test), best on the first."""
    front = pareto_front(records, spec)
    if not front:
        return None
    sign = 1.0 if spec.primary.mode == "max" else -1.0
    best = max(front, key=lambda r: sign * r.objectives[spec.primary.metric])
    return BestTrial(best.trial_id, best.run_id, best.params, best.objectives)


def open_parent(spec: SweepSpec, tracking_uri: str | None, run_id: str | None, log: Log):
    """Create the sweep's parent run (or reopen it on resume), with the spec and the sweep's settings."""
    from dcad.platform.tracking import TrackingOptions, start_run

    tags = {"dcad.sweep": spec.name, "dcad.sweep_series": spec.series or spec.name,
            "dcad.objectives": json.dumps([o.model_dump() for o in spec.objective])}
    tracker = start_run(TrackingOptions(tracking_uri, spec.experiment, spec.name, tags=tags), "sweep", run_id=run_id)
    if run_id is None:
        tracker.log_params({
            "sweep.name": spec.name, "sweep.base": spec.base.profile or spec.base.config, "sweep.dataset": spec.dataset,
            "sweep.num_trials": spec.num_trials, "sweep.max_concurrent": spec.max_concurrent,
            "sweep.sampler": spec.sampler.type, "sweep.seed": spec.sampler.seed,
            "sweep.objective": ",".join(f"{m}:{mode}" for m, mode in spec.objectives),
            "sweep.early_stopping": json.dumps(spec.early_stopping.model_dump()) if spec.early_stopping else "none",
            "sweep.search_space": ",".join(spec.search_space), "sweep.workers": spec.resources.workers,
        })
        with tempfile.TemporaryDirectory(prefix="dcad-sweep-") as tmp:
            path = Path(tmp) / "sweep.yaml"
            path.write_text(spec.to_yaml())
            tracker.log_artifact(path)
    log(f"MLflow parent run {tracker.run_id} in experiment '{spec.experiment}' ({tracker.link or tracker.uri})")
    return tracker


def record_outcome(tracker, result: SweepResult) -> None:
    """Trial counts, and the best trial (tags and `best_*` metrics), on the parent run."""
    statuses = [t.status for t in result.trials]
    tracker.log_metrics({f"trials_{s}": float(statuses.count(s)) for s in ("finished", "stopped", "failed", "incomplete")})
    best = result.best_trial
    if best is not None:
        tracker.set_tags({"dcad.best_trial_id": best.trial_id, "dcad.best_run_id": best.run_id or "",
                          "dcad.best_params": json.dumps(best.params), "dcad.pareto_trials": ",".join(result.pareto)})
        tracker.log_metrics({f"best_{k}": v for k, v in best.objectives.items()})


def end_orphaned_trials(parent, log: Log) -> None:
    """End FAILED (tagged `dcad.orphaned`) the trial runs left RUNNING by a process that died; run when a sweep
    resumes and when it ends (by then every writer of an earlier driver is gone)."""
    from dcad.platform.tracking import end_orphaned_runs

    ended = end_orphaned_runs(parent.client, parent.experiment_id, f"tags.mlflow.parentRunId = '{parent.run_id}'",
                              "its process died before it ended the run; found by dcad sweep")
    if ended:
        log(f"{len(ended)} trial run(s) whose process died while RUNNING marked FAILED: {', '.join(ended)}")


def mark_stopped_children(client, records: list[TrialRecord]) -> None:
    """End KILLED the runs of trials that ASHA stopped (also when the stop reached the trial as an exception and
    its handler ended the run FAILED) or that an interruption left RUNNING."""
    for r in records:
        if r.run_id and r.status in ("stopped", "incomplete"):
            try:
                status = client.get_run(r.run_id).info.status
                if status == "RUNNING" or (r.status == "stopped" and status == "FAILED"):
                    client.set_tag(r.run_id, "dcad.trial_status", r.status)
                    client.set_terminated(r.run_id, "KILLED")
            except Exception:  # noqa: BLE001 - best effort; the sweep's own result is what matters
                pass


def log_study_plots(tracker, study_storage: str, spec: SweepSpec, log: Log) -> None:
    """History, parameter importance and (several objectives) Pareto-front PNGs of the sweep's study under `plots/`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna
    import optuna.visualization.matplotlib as ovm

    study = optuna.load_study(study_name=spec.name, storage=study_storage)
    names = [o.metric for o in spec.objective]
    history = ovm.plot_optimization_history
    if spec.multi_objective:
        plots = {"pareto_front.png": partial(ovm.plot_pareto_front, study, target_names=names)}
        for i, name in enumerate(names):
            plots[f"history_{name}.png"] = partial(history, study, target=lambda t, i=i: t.values[i], target_name=name)
        first = {"target": lambda t: t.values[0]}
    else:
        plots, first = {"history.png": partial(history, study, target_name=names[0])}, {}
    plots["param_importances.png"] = partial(ovm.plot_param_importances, study, target_name=names[0], **first)
    with tempfile.TemporaryDirectory(prefix="dcad-plots-") as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "experimental" plot functions, importance with few trials
        for filename, draw in plots.items():
            try:
                ax = draw()
                figure = ax.figure if hasattr(ax, "figure") else ax.flat[0].figure
                figure.savefig(Path(tmp) / filename, dpi=100, bbox_inches="tight")
                plt.close(figure)
            except Exception as err:  # noqa: BLE001 - e.g. importance needs 2+ finished trials
                log(f"plot {filename} skipped ({describe(err, 200)})")
        tracker.log_artifacts(Path(tmp), "plots")


def below_register_floor(records: list[TrialRecord], best: BestTrial, spec: SweepSpec) -> str:
    """What keeps the best trial under `spec.register_floor` (validation metrics only), or ''."""
    from dcad.platform.gate import below_floor

    metrics = next((r.metrics for r in records if r.trial_id == best.trial_id), {})
    low = below_floor({"mean": metrics}, FLOOR_METRICS, spec.register_floor)
    shown = [f"{m} {'missing' if v is None else f'{v:.3f}'}" for m, v in low.items()]
    return " and ".join(shown) + (" below the floor" if shown else "")


def register_best(client, spec: SweepSpec, best: BestTrial, data: Path, tracking_uri: str, log=None) -> str:
    """Register the best trial's model as `spec.register_best` @challenger through `registry.promote`, with the
    trial's own test evaluation as its record; the alias always moves (champion stays the gated `dcad promote`)."""
    from dcad.platform.evaluation import uri_evaluator
    from dcad.platform.registry import PromotionRequest, promote

    recorded = recorded_evaluation(client, best.run_id)
    real = uri_evaluator(tracking_uri)

    def evaluate(uri: str, root: Path) -> dict:
        return recorded if uri.startswith("models:/m-") and recorded else real(uri, root)

    request = PromotionRequest(spec.register_best, best.run_id, alias="challenger", data=data, force=True, floor=0.0)
    return promote(client, request, evaluate, log=log).version


def recorded_evaluation(client, run_id: str) -> dict | None:
    """The test evaluation a trial logged (`test_{metric}/{category}`), as an evaluation result."""
    metrics = client.get_run(run_id).data.metrics
    categories: dict[str, dict[str, float]] = {}
    for key, value in metrics.items():
        if key.startswith("test_") and "/" in key:
            metric, category = key[len("test_"):].split("/", 1)
            categories.setdefault(category, {})[metric] = value
    if not categories:
        return None
    mean = {k.removeprefix("test_"): v for k, v in metrics.items() if k.startswith("test_") and "/" not in k}
    return {"categories": categories, "mean": mean}
