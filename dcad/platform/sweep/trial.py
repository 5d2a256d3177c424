"""One sweep trial: a Tune function trainable that runs a Ray Train training and evaluates its model once.

`run_trial` (inside a Tune trial, 0.01 CPU) builds the trial's config from the base config and the
sampled parameters, opens (or, after a resume, reopens) its nested MLflow run, and starts the same
Ray Train run as `dcad train --workers N` (`dcad.platform.ray_train.train_on_ray`) under the stable
name `trial-<trial id>` in the sweep's storage, so a restored trial continues from its own last
checkpoint. `SweepReportCallback` forwards every per-epoch report of rank 0 to Tune (ASHA's clock is
the global epoch; Optuna sees the validation metric). When training ends the trial measures the
inference time per image on the *validation* images, evaluates the model once on the test split for the
record, logs metrics, config and model to its MLflow run, and reports one last result. Nothing from
the test split is ever an objective.
"""

from __future__ import annotations

import copy
import math
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ray.tune.integration.ray_train import TuneReportCallback

from dcad.platform.sweep.reporting import DONE_KEY
from dcad.platform.sweep.search import decode_params

TRIALS_DIR = "trials"


@dataclass(frozen=True)
class TrialContext:
    """What every trial of a sweep shares (plain values; handed to the trainable by `tune.with_parameters`)."""

    sweep: str
    base_cfg: dict[str, Any]
    data_root: str
    storage: str  # the sweep directory: a path or s3://bucket/prefix/NAME
    workers: int
    cpus_per_worker: float
    gpus_per_worker: float
    objectives: tuple[str, ...]
    carried: tuple[str, ...]  # metrics every result must hold (Tune checks the searcher's and ASHA's)
    tracking_uri: str | None = None
    experiment: str = "dcad"
    parent_run_id: str | None = None
    dataset_digest: str | None = None
    address: str | None = None
    tags: dict[str, str] = field(default_factory=dict)


def train_run_name(trial_id: str) -> str:
    return f"trial-{trial_id}"


def trial_config(base_cfg: dict[str, Any], params: dict[str, Any]):
    """The DCADConfig of a trial: the base config with the sampled dotted keys set."""
    from dcad.core.config import DCADConfig, apply_overrides

    return DCADConfig.from_dict(apply_overrides(copy.deepcopy(base_cfg), params), "trial parameters")


class SweepReportCallback(TuneReportCallback):
    """`TuneReportCallback` whose results always hold the sweep's metrics (the last value seen, else NaN).

    The base stage validates every epoch and the refiner stage may not (or reports other keys); Tune
    refuses a result without the searcher's or the scheduler's metric, so those are carried forward.
    Each result also gets `report_time` (when it reached the controller) and the trial's MLflow run id.
    """

    def __init__(self, carried: tuple[str, ...], mlflow_run_id: str | None) -> None:
        super().__init__()
        self.carried, self.mlflow_run_id = tuple(carried), mlflow_run_id
        self.last: dict[str, float] = {}

    def after_report(self, run_context, metrics, checkpoint) -> None:
        if metrics:
            metrics = [self._complete(metrics[0]), *metrics[1:]]
        super().after_report(run_context, metrics, checkpoint)

    def _complete(self, result: dict[str, Any]) -> dict[str, Any]:
        result = dict(result)
        for key in self.carried:
            if _finite(result.get(key)):
                self.last[key] = float(result[key])
            else:
                result[key] = self.last.get(key, math.nan)
        result["report_time"] = time.time()
        result[DONE_KEY] = 0.0
        if self.mlflow_run_id:
            result["mlflow_run_id"] = self.mlflow_run_id
        return result


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# ---- the trainable -------------------------------------------------------------------------------
def run_trial(config: dict[str, Any], context: TrialContext) -> None:
    """The Tune function trainable (`tune.with_parameters(run_trial, context=...)`)."""
    import ray.tune

    from dcad.platform.ray_train import RayTrainOptions, RayRunPlan, latest_checkpoint_meta, train_on_ray
    from dcad.platform.storage import resolve_storage

    tune_context = ray.tune.get_context()
    trial_id = tune_context.get_trial_id()
    params = decode_params(config)
    cfg = trial_config(context.base_cfg, params)
    tracker = open_trial_run(context, trial_id, train_run_name(trial_id), cfg, params)
    options = RayTrainOptions(context.workers, context.cpus_per_worker, context.gpus_per_worker, context.address)
    storage = resolve_storage(f"{context.storage.rstrip('/')}/{TRIALS_DIR}", Path(context.storage) / TRIALS_DIR)
    name = train_run_name(trial_id)
    plan = RayRunPlan(options, name, storage, latest_checkpoint_meta(storage, name))
    resumed_epoch = float((plan.previous or {}).get("epoch", 0))
    run_id = tracker.run_id if tracker else None
    started = time.time()
    try:
        outcome = train_on_ray(
            cfg, Path(context.data_root), plan,
            tracking_uri=tracker.uri if tracker else None, mlflow_run_id=run_id,
            log=lambda m: print(f"dcad: trial {trial_id}: {m}", flush=True),
            callbacks=[SweepReportCallback(context.carried, run_id)],
            worker_phases=False,  # the driver prints each trial's epochs and outcome
        )
        trained = time.time()
        final = finish_trial(cfg, context, outcome, tracker)
    except BaseException:
        if tracker is not None:
            tracker.finish("FAILED")
        raise
    final.update(fit_start=started, fit_end=trained, resumed_from_epoch=resumed_epoch, report_time=time.time())
    if run_id:
        final["mlflow_run_id"] = run_id
    wait_for_forwarded_reports()
    ray.tune.report(final)


def open_trial_run(context: TrialContext, trial_id: str, trial_name: str, cfg, params: dict[str, Any]):
    """The trial's nested MLflow run: the one already tagged with this trial id (a resumed trial), else a new one."""
    if not context.tracking_uri:
        return None
    from dcad.platform.tracking import TrackingOptions, start_run

    existing = find_trial_run(context, trial_id)
    tags = {"dcad.sweep": context.sweep, "dcad.trial_id": trial_id, **context.tags}
    options = TrackingOptions(context.tracking_uri, context.experiment, trial_name, context.parent_run_id, tags=tags)
    tracker = start_run(options, "trial", run_id=existing)
    if existing is None:
        tracker.log_params(cfg.flat())
        tracker.set_tags({"dcad.profile": cfg.profile, **{f"dcad.param.{k}": str(v) for k, v in params.items()}})
        if context.dataset_digest:
            tracker.log_dataset(context.data_root, context.dataset_digest, "train")
    else:
        tracker.set_tags({"dcad.resumed": "true"})
    return tracker


def find_trial_run(context: TrialContext, trial_id: str) -> str | None:
    from dcad.platform.store import mlflow_client

    client = mlflow_client(context.tracking_uri)
    experiment = client.get_experiment_by_name(context.experiment)
    if experiment is None:
        return None
    filters = f"tags.`dcad.trial_id` = '{trial_id}' and tags.`dcad.sweep` = '{context.sweep}'"
    runs = client.search_runs([experiment.experiment_id], filter_string=filters, max_results=1)
    return runs[0].info.run_id if runs else None


def finish_trial(cfg, context: TrialContext, outcome, tracker) -> dict[str, Any]:
    """Time inference on validation images, evaluate once on test, log it all; the trial's last result."""
    from dcad.core.data import build_splits
    from dcad.core.inference import evaluate, predict_batches
    from dcad.train.pipeline import resolve_device

    device = resolve_device("auto")
    model = outcome.model.to(device)
    splits = build_splits(Path(context.data_root), cfg.data)
    bs = cfg.train.eval_batch_size
    infer_start = time.time()
    for _ in predict_batches(model, splits.val, bs, device):
        pass
    ms_per_image = 1000 * (time.time() - infer_start) / max(1, len(splits.val))
    eval_start = time.time()
    result = evaluate(model, splits.test, bs, device)
    eval_end = time.time()
    result["validation"] = dict(outcome.val_metrics)
    result["timing"] = {"train_seconds": outcome.fit_seconds, "eval_seconds": eval_end - eval_start, "ms_per_image": ms_per_image}
    if tracker is not None:
        log_trial_outputs(tracker, model, result, context)
    final: dict[str, Any] = {k: float(v) for k, v in outcome.val_metrics.items() if _finite(v)}
    final.update({f"test_{k}": float(v) for k, v in result["mean"].items() if _finite(v)})
    final.update(
        ms_per_image=ms_per_image, train_seconds=outcome.fit_seconds, infer_start=infer_start,
        eval_start=eval_start, eval_end=eval_end,
        epoch=float(_total_epochs(cfg)), **{DONE_KEY: 1.0},
    )
    for key in context.carried:  # e.g. val_loss, which the final validation does not measure
        final.setdefault(key, _last_value(outcome.history, key))
    return final


def _total_epochs(cfg) -> int:
    from dcad.platform.ray_worker import total_epochs

    return total_epochs(cfg)


def _last_value(history: list[dict], key: str) -> float:
    values = [h[key] for h in history if _finite(h.get(key))]
    return float(values[-1]) if values else math.nan


def log_trial_outputs(tracker, model, result: dict, context: TrialContext) -> None:
    """Metrics (validation, test, timing), config and the model, like `dcad train` does; ends the run."""
    from dcad.core.json_io import write_json
    from dcad.core.model.model_dir import save_model
    from dcad.platform.tracking import log_model_outputs

    with tempfile.TemporaryDirectory(prefix="dcad-trial-") as tmp:
        model_dir = Path(tmp) / "model"
        extra = {"dataset_digest": context.dataset_digest, "dataset_root": context.data_root}
        save_model(model, model_dir, extra={k: v for k, v in extra.items() if v})
        write_json(model_dir / "metrics.json", result)
        log_model_outputs(tracker, model_dir)
    tracker.log_metrics({"ms_per_image": result["timing"]["ms_per_image"], "train_seconds": result["timing"]["train_seconds"]})
    tracker.finish("FINISHED")


def wait_for_forwarded_reports(timeout_s: float = 30.0) -> None:
    """Let Tune take the last forwarded Train report before the trial reports its final result."""
    from ray.train._internal.session import get_session

    queue = getattr(get_session(), "_inter_actor_queue", None)
    deadline = time.time() + timeout_s
    while queue is not None and time.time() < deadline and not queue.empty():
        time.sleep(0.1)
    time.sleep(0.3)
