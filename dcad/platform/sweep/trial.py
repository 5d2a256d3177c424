"""One sweep trial: a Tune trainable that trains what the sweep does not hold yet, then logs it like `dcad train`
(docs/design.md)."""

from __future__ import annotations

import copy
import functools
import logging
import math
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from dcad.platform.ray_train import RayTrainOutcome as TrialOutcome
from dcad.platform.ray_worker import EpochReporter, restored_checkpoint, stage_store, train_reporting
from dcad.platform.sweep.reporting import DONE_KEY, is_finite
from dcad.platform.sweep.search import decode_params
from dcad.platform.tracking_buffer import call_when_reachable
from dcad.platform.training import ended_run, finish_training, log_training_inputs

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
    carried: tuple[str, ...]  # metrics every result must hold (Tune checks the searcher's and ASHA's)
    tracking_uri: str | None = None
    experiment: str = "dcad"
    parent_run_id: str | None = None
    dataset_digest: str | None = None
    address: str | None = None


def trial_config(base_cfg: dict[str, Any], params: dict[str, Any]):
    """The DCADConfig of a trial: the base config with the sampled dotted keys set."""
    from dcad.core.config import DCADConfig, apply_overrides

    return DCADConfig.from_dict(apply_overrides(copy.deepcopy(base_cfg), params), "trial parameters")


Filler = Callable[[dict[str, Any]], dict[str, Any]]


def result_filler(carried: tuple[str, ...], mlflow_run_id: str | None) -> Filler:
    """Fills every result with the sweep's metrics (the last value seen, else NaN: Tune refuses a result without the
    searcher's or the scheduler's metric), `report_time` and the trial's MLflow run id."""
    last: dict[str, float] = {}

    def fill(result: dict[str, Any]) -> dict[str, Any]:
        result = {DONE_KEY: 0.0, **result, "report_time": time.time()}
        for key in carried:
            if is_finite(result.get(key)):
                last[key] = float(result[key])
            else:
                result[key] = last.get(key, math.nan)
        return {**result, "mlflow_run_id": mlflow_run_id} if mlflow_run_id else result
    return fill


def log(trial_id: str, message: str) -> None:
    print(f"dcad: trial {trial_id}: {message}", flush=True)


def run_trial(config: dict[str, Any], context: TrialContext) -> None:
    """The Tune function trainable (`tune.with_parameters(run_trial, context=...)`)."""
    import ray.tune

    for name in ("", "ray.train", "ray.tune", "mlflow.store.db.utils"):  # the driver prints the progress
        logging.getLogger(name).setLevel(logging.WARNING)
    trial_id = ray.tune.get_context().get_trial_id()
    params = decode_params(config)
    cfg = trial_config(context.base_cfg, params)
    done = call_when_reachable(lambda: finished_earlier(context, trial_id), f"trial {trial_id}")
    if done is not None:  # the driver died after this trial ended, before Tune saved the experiment
        log(trial_id, "finished before the sweep was stopped: its result is read back from its MLflow run")
        ray.tune.report({**done, "epoch": float(cfg.total_epochs)})
        return
    tracker = call_when_reachable(lambda: open_trial_run(context, trial_id, cfg, params), f"trial {trial_id}")
    fill = result_filler(context.carried, tracker.run_id if tracker else None)
    started = time.time()
    with ended_run(tracker, strict=False):
        stages = stage_store(context.storage, context.dataset_digest or "")
        if context.workers == 1 or stages.has("weights", cfg):  # re-scoring needs no workers
            outcome = train_in_trial(cfg, context, trial_id, tracker, stages, fill)
        else:  # the workers load the stages they start from themselves
            outcome = train_with_workers(cfg, context, trial_id, tracker, fill)
        trained = time.time()
        final = finish_trial(cfg, context, outcome, tracker)
    final.update(fit_start=started, fit_end=trained, resumed_from_epoch=outcome.resumed_from_epoch)
    ray.tune.report(fill({**final, DONE_KEY: 1.0}))


def train_in_trial(cfg, context: TrialContext, trial_id: str, tracker, stages, fill: Filler) -> TrialOutcome:
    """Train in this process from the sweep's best shared start, one `ray.tune.report` with a checkpoint per epoch."""
    import ray.tune

    from dcad.core.device import resolve_device

    def report(metrics: dict, directory: Path | None, name: str) -> None:
        ray.tune.report(fill(metrics), checkpoint=ray.tune.Checkpoint.from_directory(str(directory)))

    start = stages.best_start(cfg)
    with restored_checkpoint(ray.tune.get_checkpoint(), "trial", lambda message: log(trial_id, message)) as (local, meta):
        if meta is not None:
            log(trial_id, f"resuming from its checkpoint of epoch {meta.get('epoch')}")
        if start.weights is not None:
            log(trial_id, "re-scoring: the sweep already trained this model's weights")
        elif start.base is not None and meta is None:
            log(trial_id, "starting from the sweep's trained base branch")
        reporter = EpochReporter(cfg, local, report, tracker=tracker, history=list((meta or {}).get("history", [])))
        began, wall_start = time.perf_counter(), time.time()
        model, val_metrics = train_reporting(cfg, trial_splits(context.data_root, cfg.data), reporter, meta,
                                             device=resolve_device("auto"), stages=stages, start=start)
        return TrialOutcome(model, val_metrics, reporter.history, time.perf_counter() - began,
                            float((meta or {}).get("epoch", 0)), start.what, (wall_start, time.time()))


def trial_splits(data_root: str, data_cfg):
    """The dataset's splits, built once per trial process (Tune reuses it for the next trial)."""
    return _splits(data_root, data_cfg.model_dump_json())


@functools.lru_cache(maxsize=1)
def _splits(data_root: str, data_cfg_json: str):
    from dcad.core.config import DataConfig
    from dcad.core.data import build_splits

    return build_splits(Path(data_root), DataConfig.model_validate_json(data_cfg_json))


def train_with_workers(cfg, context: TrialContext, trial_id: str, tracker, fill: Filler) -> TrialOutcome:
    """A `TorchTrainer` run `trial-<id>` of `context.workers` workers; rank 0's reports forwarded to Tune as they come."""
    import ray.tune
    from ray.train import UserCallback
    from ray.util.queue import Empty, Queue

    from dcad.platform.ray_train import RayRunPlan, RayTrainOptions, latest_checkpoint_meta, train_on_ray
    from dcad.platform.storage import resolve_storage

    class ForwardReports(UserCallback):
        def __init__(self, queue) -> None:
            self.queue = queue

        def after_report(self, run_context, metrics, checkpoint) -> None:
            if metrics:
                self.queue.put(dict(metrics[0]))

    options = RayTrainOptions(context.workers, context.cpus_per_worker, context.gpus_per_worker, context.address)
    storage = resolve_storage(f"{context.storage.rstrip('/')}/{TRIALS_DIR}", Path(context.storage) / TRIALS_DIR)
    name = f"trial-{trial_id}"
    plan = RayRunPlan(options, name, storage, latest_checkpoint_meta(storage, name))
    queue = Queue(actor_options={"num_cpus": 0})
    outcome: dict[str, Any] = {}

    def fit() -> None:
        try:
            outcome["result"] = train_on_ray(
                cfg, Path(context.data_root), plan, tracking_uri=tracker.uri if tracker else None,
                mlflow_run_id=tracker.run_id if tracker else None, log=lambda m: log(trial_id, m),
                callbacks=[ForwardReports(queue)], worker_phases=False, stages_root=context.storage,
                dataset_digest=context.dataset_digest)
        except BaseException as err:  # noqa: BLE001 - re-raised in the trial's own thread
            outcome["error"] = err

    thread = threading.Thread(target=fit, name=f"dcad-{name}", daemon=True)  # Tune's reports stay in this thread
    thread.start()
    while thread.is_alive() or not queue.empty():  # reports are put (and waited for) before fit returns
        try:
            ray.tune.report(fill(queue.get(timeout=1.0)))
        except Empty:
            continue
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


def open_trial_run(context: TrialContext, trial_id: str, cfg, params: dict[str, Any]):
    """The trial's nested MLflow run: the one already tagged with this trial id (a resumed trial), else a new one."""
    if not context.tracking_uri:
        return None
    from dcad.platform.tracking import TrackingOptions, start_run

    found = find_trial_run(context, trial_id)
    existing = found.info.run_id if found is not None else None
    tags = {"dcad.sweep": context.sweep, "dcad.trial_id": trial_id}
    options = TrackingOptions(context.tracking_uri, context.experiment, f"trial-{trial_id}", context.parent_run_id, tags=tags)
    tracker = start_run(options, "trial", run_id=existing)
    if existing is None:
        log_training_inputs(tracker, cfg, context.data_root, context.dataset_digest)
        tracker.set_tags({f"dcad.param.{k}": str(v) for k, v in params.items()})
    else:
        tracker.set_tags({"dcad.resumed": "true"})
    return tracker


def finished_earlier(context: TrialContext, trial_id: str) -> dict[str, Any] | None:
    """The final result of this trial when its MLflow run already ended FINISHED with it, else None."""
    run = find_trial_run(context, trial_id) if context.tracking_uri else None
    if run is None or run.info.status != "FINISHED" or not all(k in run.data.metrics for k in context.carried):
        return None
    return {**run.data.metrics, DONE_KEY: 1.0, "mlflow_run_id": run.info.run_id, "report_time": time.time()}


def find_trial_run(context: TrialContext, trial_id: str):
    """The MLflow run of this trial (one a stopped sweep left), or None."""
    from dcad.platform.mlflow_store import mlflow_client

    client = mlflow_client(context.tracking_uri)
    experiment = client.get_experiment_by_name(context.experiment)
    if experiment is None:
        return None
    filters = f"tags.`dcad.trial_id` = '{trial_id}' and tags.`dcad.sweep` = '{context.sweep}'"
    runs = client.search_runs([experiment.experiment_id], filter_string=filters, max_results=1)
    return runs[0] if runs else None


def finish_trial(cfg, context: TrialContext, outcome: TrialOutcome, tracker) -> dict[str, Any]:
    """Save, evaluate (ms_per_image on validation; test once, for the record) and log like `dcad train`: the last result."""
    from dcad.core.device import resolve_device

    device = resolve_device("auto")
    splits = trial_splits(context.data_root, cfg.data)
    infer_start = time.time()
    with tempfile.TemporaryDirectory(prefix="dcad-trial-") as tmp:
        result = finish_training(outcome.model.to(device), Path(tmp) / "model", splits, context.data_root, tracker=tracker,
                                 train_seconds=outcome.fit_seconds, val_metrics=dict(outcome.val_metrics),
                                 history=outcome.history, device=device, dataset_digest=context.dataset_digest,
                                 time_on_validation=True)
    eval_end = time.time()
    timing = result["timing"]
    if tracker is not None:
        tracker.log_metrics({"ms_per_image": timing["ms_per_image"], "train_seconds": timing["train_seconds"]})
    final: dict[str, Any] = {k: float(v) for k, v in outcome.val_metrics.items() if is_finite(v)}
    final.update({f"test_{k}": float(v) for k, v in result["mean"].items() if is_finite(v)})
    final.update(ms_per_image=timing["ms_per_image"], train_seconds=outcome.fit_seconds, infer_start=infer_start,
                 eval_end=eval_end, epoch=float(cfg.total_epochs), started_from=outcome.started_from, **{DONE_KEY: 1.0})
    for key in context.carried:  # e.g. val_loss, which the final validation does not measure
        values = [h[key] for h in outcome.history if is_finite(h.get(key))]
        final.setdefault(key, float(values[-1]) if values else math.nan)
    if outcome.train_span:
        final["train_start"], final["train_end"] = outcome.train_span
    return final
