"""One sweep trial: a Tune function trainable that trains (only what it cannot share) and evaluates once.

`run_trial` (inside a Tune trial) builds the trial's config from the base config and the sampled
parameters and opens (or, after a resume, reopens) its nested MLflow run. It then starts from the
latest training stage the sweep already holds for that config (`dcad.platform.stage_store`): trained
weights (then it only calibrates and scores: a *re-scoring*), a trained base branch (it trains the
refiner), or the feature cache; and it publishes what it trains for the trials after it.

One worker (the default): the trial trains inside its own function, reporting every epoch to Tune with a
checkpoint (`ray.tune.report`), so a restored trial continues from `ray.tune.get_checkpoint()`. Several
workers: it starts a Ray Train `TorchTrainer` under the stable name `trial-<trial id>` (a restored trial
continues from that run's checkpoint) and forwards each epoch report of rank 0 to Tune through a Ray queue.
Either way, when training ends the trial measures the inference time per image on the *validation*
images, evaluates the model once on the test split for the record, logs metrics, config and model to its
MLflow run and reports one last result. Nothing from the test split is ever an objective.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dcad.platform.ray_worker import MANIFEST_KEY, META_FILE, file_sizes, missing_files, read_meta, worker_temp_dir
from dcad.platform.sweep.reporting import DONE_KEY
from dcad.platform.sweep.search import decode_params
from dcad.platform.tracking_buffer import call_when_reachable

TRIALS_DIR = "trials"
logger = logging.getLogger("dcad.sweep")


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


@dataclass
class TrialOutcome:
    model: Any  # DRDC
    val_metrics: dict[str, float]
    history: list[dict]
    fit_seconds: float
    resumed_from_epoch: float = 0.0
    started_from: str = "nothing"
    train_span: tuple[float, float] | None = None  # wall-clock start and end of `train_drdc` (one-worker trials)


def train_run_name(trial_id: str) -> str:
    return f"trial-{trial_id}"


def trial_config(base_cfg: dict[str, Any], params: dict[str, Any]):
    """The DCADConfig of a trial: the base config with the sampled dotted keys set."""
    from dcad.core.config import DCADConfig, apply_overrides

    return DCADConfig.from_dict(apply_overrides(copy.deepcopy(base_cfg), params), "trial parameters")


class ResultFiller:
    """Makes every result hold the sweep's metrics (the last value seen, else NaN).

    The base stage validates every epoch and the refiner stage may not (or reports other keys); Tune
    refuses a result without the searcher's or the scheduler's metric, so those are carried forward.
    Each result also gets `report_time` and the trial's MLflow run id.
    """

    def __init__(self, carried: tuple[str, ...], mlflow_run_id: str | None) -> None:
        self.carried, self.mlflow_run_id = tuple(carried), mlflow_run_id
        self.last: dict[str, float] = {}

    def __call__(self, result: dict[str, Any]) -> dict[str, Any]:
        result = dict(result)
        for key in self.carried:
            if _finite(result.get(key)):
                self.last[key] = float(result[key])
            else:
                result[key] = self.last.get(key, math.nan)
        result["report_time"] = time.time()
        result.setdefault(DONE_KEY, 0.0)
        if self.mlflow_run_id:
            result["mlflow_run_id"] = self.mlflow_run_id
        return result


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def log(trial_id: str, message: str) -> None:
    print(f"dcad: trial {trial_id}: {message}", flush=True)


# ---- the trainable -------------------------------------------------------------------------------
def run_trial(config: dict[str, Any], context: TrialContext) -> None:
    """The Tune function trainable (`tune.with_parameters(run_trial, context=...)`)."""
    import ray.tune

    quiet_logs()
    trial_id = ray.tune.get_context().get_trial_id()
    params = decode_params(config)
    cfg = trial_config(context.base_cfg, params)
    done = call_when_reachable(lambda: finished_earlier(context, trial_id), f"trial {trial_id}")
    if done is not None:  # the driver died after this trial ended, before Tune saved the experiment
        log(trial_id, "finished before the sweep was stopped: its result is read back from its MLflow run")
        ray.tune.report({**done, "epoch": float(_total_epochs(cfg))})
        return
    tracker = call_when_reachable(lambda: open_trial_run(context, trial_id, train_run_name(trial_id), cfg, params), f"trial {trial_id}")
    run_id = tracker.run_id if tracker else None
    fill = ResultFiller(context.carried, run_id)
    started = time.time()
    try:
        stages = stage_store(context)
        if context.workers == 1 or stages.has("weights", cfg):  # re-scoring needs no workers
            outcome = train_in_trial(cfg, context, trial_id, tracker, stages, stages.best_start(cfg), fill)
        else:  # the workers load the stages they start from themselves
            outcome = train_with_workers(cfg, context, trial_id, tracker, fill)
        trained = time.time()
        final = finish_trial(cfg, context, outcome, tracker)
    except BaseException:
        if tracker is not None:
            tracker.finish("FAILED")
        raise
    final.update(fit_start=started, fit_end=trained, resumed_from_epoch=outcome.resumed_from_epoch)
    ray.tune.report(fill({**final, DONE_KEY: 1.0}))


def quiet_logs() -> None:
    """Warnings and errors only from the libraries in a trial's process: the driver prints the progress."""
    for name in ("", "ray.train", "ray.tune", "mlflow.store.db.utils"):
        logging.getLogger(name).setLevel(logging.WARNING)


def stage_store(context: TrialContext):
    from dcad.platform.stage_store import StageStore
    from dcad.platform.storage import resolve_storage

    return StageStore(resolve_storage(context.storage, Path(context.storage)), context.dataset_digest or "")


def train_in_trial(cfg, context: TrialContext, trial_id: str, tracker, stages, start, fill: ResultFiller) -> TrialOutcome:
    """Train in this process from `start`, one `ray.tune.report` (with a checkpoint) per epoch."""
    from dcad.train.pipeline import TrainHooks, resolve_device, train_drdc
    from dcad.train.shared_stages import TrainedWeights

    local = worker_temp_dir("trial")
    try:
        meta = restore_checkpoint(local)
        resumed = float((meta or {}).get("epoch", 0))
        if meta is not None:
            log(trial_id, f"resuming from its checkpoint of epoch {meta.get('epoch')}")
        if start.weights is not None:
            log(trial_id, "re-scoring: the sweep already trained this model's weights")
        elif start.base is not None and meta is None:
            log(trial_id, "starting from the sweep's trained base branch")
        epochs = EpochReporter(cfg, local, tracker, fill, list((meta or {}).get("history", [])))
        hooks = TrainHooks(on_epoch=epochs, on_shared=lambda stage, result: stages.publish(stage, cfg, result))
        hooks.history.extend(epochs.history)
        splits = trial_splits(context.data_root, cfg.data)
        began, wall_start = time.perf_counter(), time.time()
        model, val_metrics = train_drdc(cfg, splits, device=resolve_device("auto"), checkpoint_dir=local,
                                        resume=meta is not None, hooks=hooks, start=start)
        history = unique_epochs(hooks.history)
        if start.weights is None:
            stages.publish("weights", cfg, TrainedWeights.of(model, history))
        span = (wall_start, time.time())
        return TrialOutcome(model, val_metrics, history, time.perf_counter() - began, resumed, start.what, span)
    finally:
        shutil.rmtree(local, ignore_errors=True)


_SPLITS: dict[str, Any] = {}


def trial_splits(data_root: str, data_cfg):
    """The dataset's splits, built once per trial process (Tune reuses it for the next trial)."""
    from dcad.core.data import build_splits

    key = json.dumps([data_root, data_cfg.model_dump(mode="json")], sort_keys=True)
    if key not in _SPLITS:
        _SPLITS.clear()
        _SPLITS[key] = build_splits(Path(data_root), data_cfg)
    return _SPLITS[key]


def unique_epochs(history: list[dict]) -> list[dict]:
    """One entry per (stage, epoch), the last one kept, in training order."""
    seen: dict[tuple, dict] = {}
    for entry in history:
        seen[(entry.get("stage"), entry.get("epoch"))] = entry
    order = {"base": 0, "refiner": 1}
    return sorted(seen.values(), key=lambda e: (order.get(str(e.get("stage")), 2), int(e.get("epoch") or 0)))


def restore_checkpoint(local: Path) -> dict[str, Any] | None:
    """Lay out the trial's last Tune checkpoint (after a restore) in `local`; its metadata, or None."""
    import ray.tune

    checkpoint = ray.tune.get_checkpoint()
    if checkpoint is None:
        return None
    checkpoint.to_directory(str(local))
    meta = read_meta(local)
    problem = missing_files(local, meta) if meta is not None else None
    if problem is None:
        return meta
    logger.warning(f"the trial's checkpoint of epoch {meta.get('epoch')} is incomplete ({problem}): training from the start")
    shutil.rmtree(local, ignore_errors=True)
    local.mkdir()
    return None


class EpochReporter:
    """The pipeline's epoch reports as Tune results, each with a checkpoint of the training so far."""

    def __init__(self, cfg, local: Path, tracker, fill: ResultFiller, history: list[dict]) -> None:
        self.cfg, self.local, self.tracker, self.fill, self.history = cfg, local, tracker, fill, history

    def __call__(self, report) -> None:
        import ray.tune

        from dcad.platform.ray_worker import stage_offsets

        epoch = stage_offsets(self.cfg)[report.stage] + report.epoch
        seconds = float(report.extra.get("seconds", float("nan")))
        self.history.append({"stage": report.stage, "epoch": report.epoch, **report.metrics, "epoch_seconds": seconds})
        if self.tracker is not None:
            self.tracker.log_epoch(report)
        meta = {"epoch": epoch, "stage": report.stage, "stage_epoch": report.epoch, "history": self.history}
        staging = worker_temp_dir("ckpt")
        try:
            shutil.copytree(self.local, staging, dirs_exist_ok=True)
            meta[MANIFEST_KEY] = file_sizes(staging)
            (staging / META_FILE).write_text(json.dumps(meta, allow_nan=True))
            metrics = {"epoch": epoch, "stage": report.stage, "stage_epoch": report.epoch, **report.metrics,
                       "epoch_seconds": seconds}
            ray.tune.report(self.fill(metrics), checkpoint=ray.tune.Checkpoint.from_directory(str(staging)))
        finally:
            shutil.rmtree(staging, ignore_errors=True)


# ---- several workers: a Ray Train run per trial ---------------------------------------------------------
def train_with_workers(cfg, context: TrialContext, trial_id: str, tracker, fill: ResultFiller) -> TrialOutcome:
    """A `TorchTrainer` run of `context.workers` workers; its epoch reports forwarded to Tune as they come."""
    import ray.tune
    from ray.util.queue import Empty, Queue

    from dcad.platform.ray_train import RayRunPlan, RayTrainOptions, latest_checkpoint_meta, train_on_ray
    from dcad.platform.storage import resolve_storage

    options = RayTrainOptions(context.workers, context.cpus_per_worker, context.gpus_per_worker, context.address)
    storage = resolve_storage(f"{context.storage.rstrip('/')}/{TRIALS_DIR}", Path(context.storage) / TRIALS_DIR)
    name = train_run_name(trial_id)
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

    thread = threading.Thread(target=fit, name=f"dcad-{name}", daemon=True)
    thread.start()
    while thread.is_alive() or not queue.empty():  # reports are put (and waited for) before fit returns
        try:
            ray.tune.report(fill(queue.get(timeout=1.0)))
        except Empty:
            continue
    if "error" in outcome:
        raise outcome["error"]
    result = outcome["result"]
    resumed = float((plan.previous or {}).get("epoch", 0))
    return TrialOutcome(result.model, result.val_metrics, result.history, result.fit_seconds, resumed)


def _forward_reports_class():
    from ray.train import UserCallback

    class _ForwardReports(UserCallback):
        """Puts rank 0's metrics of every Ray Train report on a Ray queue the trial function reads."""

        def __init__(self, queue) -> None:
            self.queue = queue

        def after_report(self, run_context, metrics, checkpoint) -> None:
            if metrics:
                self.queue.put(dict(metrics[0]))

    return _ForwardReports


def ForwardReports(queue):  # noqa: N802 - builds the callback class lazily (Ray Train is imported on use)
    return _forward_reports_class()(queue)


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


def finished_earlier(context: TrialContext, trial_id: str) -> dict[str, Any] | None:
    """The final result of this trial when its MLflow run already ended FINISHED with it, else None."""
    if not context.tracking_uri:
        return None
    from dcad.platform.store import mlflow_client

    run_id = find_trial_run(context, trial_id)
    if run_id is None:
        return None
    run = mlflow_client(context.tracking_uri).get_run(run_id)
    metrics = dict(run.data.metrics)
    if run.info.status != "FINISHED" or not all(k in metrics for k in context.carried):
        return None
    return {**metrics, DONE_KEY: 1.0, "mlflow_run_id": run_id, "report_time": time.time()}


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
    from dcad.core.inference import evaluate, predict_batches
    from dcad.train.pipeline import resolve_device

    device = resolve_device("auto")
    model = outcome.model.to(device)
    splits = trial_splits(context.data_root, cfg.data)
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
        tracker.log_history(outcome.history)  # curves of stages shared with earlier trials, too
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
    final["started_from"] = outcome.started_from
    if outcome.train_span:
        final["train_start"], final["train_end"] = outcome.train_span
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
