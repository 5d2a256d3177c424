"""`dcad train --workers N`: the DRDC training loop on N Ray Train workers (Train V2 `TorchTrainer`, DDP).

The driver (this module) resolves the checkpoint storage (local directory or S3), joins the Ray
cluster, checks that it can hold the workers, and runs a `TorchTrainer` whose `RunConfig(name=…)` is
stable: re-running the same command with the same `--name` and `--storage` continues from the last
checkpoint (Ray reads it back from storage), while a failed worker or node is replaced and training
resumes from the last checkpoint up to `max_failures` times. The final model comes back as the last
checkpoint (`final/model`). The worker side lives in `dcad.platform.ray_worker`.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from dcad.platform.errors import PlatformError
from dcad.platform.ray_cluster import CapacityWatch, WorkerShape, check_capacity, check_reachable, cluster_nodes, connect
from dcad.platform.ray_worker import (
    FINAL_DIR,
    META_FILE,
    MODEL_DIR,
    WorkerSpec,
    describe_checkpoint,
    missing_files,
    read_meta,
    total_epochs,
    train_worker,
)
from dcad.platform.secrets import redact
from dcad.platform.store import absolute_uri
from dcad.platform.storage import StorageLocation, check_writable, read_text, resolve_storage

SNAPSHOT_FILE = "checkpoint_manager_snapshot.json"  # written by Ray Train V2 next to the checkpoints
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._=-]{0,127}$")
DEFAULT_STORAGE_SUBDIR = "checkpoints"
Log = Callable[[str], None]


class RayTrainingError(PlatformError):
    """Distributed training failed for good (retries exhausted); the message says where to resume from."""

    exit_code = 1


@dataclass(frozen=True)
class RayTrainOptions:
    """The `--workers …` options of `dcad train`."""

    workers: int
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    address: str | None = None  # None: a local Ray; "auto": the running cluster; or HOST:PORT
    storage: str | None = None  # None: OUTPUT/checkpoints; a path; or s3://bucket/prefix
    name: str | None = None  # the Ray run name; the same name resumes
    max_failures: int = 2
    checkpoints_to_keep: int = 2

    def validate(self) -> None:
        if self.workers < 1:
            raise PlatformError(f"--workers {self.workers}: must be at least 1")
        if self.cpus_per_worker <= 0:
            raise PlatformError(f"--cpus-per-worker {self.cpus_per_worker:g}: must be positive")
        if self.gpus_per_worker < 0:
            raise PlatformError(f"--gpus-per-worker {self.gpus_per_worker:g}: must be zero or positive")
        if self.name is not None and not NAME_PATTERN.match(self.name):
            raise PlatformError(f"--name {self.name!r}: use letters, digits, '.', '_', '-' or '=' (at most 128)")


@dataclass
class RayRunPlan:
    """Where the run keeps its checkpoints and what an earlier attempt under the same name left there."""

    options: RayTrainOptions
    name: str
    storage: StorageLocation
    previous: dict[str, Any] | None = None  # metadata of the latest checkpoint, if any

    @property
    def where(self) -> str:
        return self.storage.describe(self.name)

    @property
    def previous_mlflow_run_id(self) -> str | None:
        return (self.previous or {}).get("mlflow_run_id")


@dataclass
class RayTrainOutcome:
    model: Any  # DRDC
    val_metrics: dict[str, float]
    history: list[dict] = field(default_factory=list)
    resumed_from: dict[str, Any] | None = None
    fit_seconds: float = 0.0


def default_run_name() -> str:
    return "dcad-train-" + datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")


def plan_run(options: RayTrainOptions, output: Path) -> RayRunPlan:
    """Resolve storage and name, check what can be checked cheaply, read the latest checkpoint of that name.

    Runs before the data and the model are loaded, so a wrong --address or --storage fails in a second.
    Writes nothing inside OUTPUT (the default storage is checked when training starts).
    """
    options.validate()
    default = Path(output).resolve() / DEFAULT_STORAGE_SUBDIR
    storage = resolve_storage(options.storage, default)
    if options.address not in (None, "", "auto", "local"):
        check_reachable(options.address)
    if storage.is_s3 or not Path(storage.path).is_relative_to(Path(output).resolve()):
        check_writable(storage)
    name = options.name or default_run_name()
    return RayRunPlan(options, name, storage, latest_checkpoint_meta(storage, name))


def latest_checkpoint_meta(storage: StorageLocation, name: str) -> dict[str, Any] | None:
    """Metadata of the checkpoint Ray will resume STORAGE/NAME from, or None (Ray starts afresh).

    That is the latest checkpoint in Ray's checkpoint-manager snapshot, which Ray updates only once a
    reported checkpoint is complete in storage; a directory uploaded after it (a crash between upload and
    snapshot) is not used by Ray, so it is not reported here either.
    """
    text = read_text(storage, storage.join(name, SNAPSHOT_FILE))
    try:
        directory = json.loads(text)["latest_checkpoint_result"]["checkpoint_dir_name"] if text else None
    except (ValueError, KeyError, TypeError):
        directory = None
    if not directory:
        return None
    meta_text = read_text(storage, storage.join(name, directory, META_FILE))
    try:
        meta = json.loads(meta_text) if meta_text else None
    except ValueError:
        meta = None
    if not isinstance(meta, dict):
        return None
    meta["checkpoint_dir"] = directory
    return meta


def train_on_ray(
    cfg,
    data_root: Path,
    plan: RayRunPlan,
    *,
    tracking_uri: str | None = None,
    mlflow_run_id: str | None = None,
    log: Log = print,
    callbacks: list | None = None,
    worker_phases: bool = True,
    stages_root: str | None = None,
    dataset_digest: str | None = None,
) -> RayTrainOutcome:
    """Run (or continue) the training described by `plan`; returns the trained, calibrated model.

    `callbacks`: Ray Train callbacks for the run's `RunConfig` (a sweep passes one that forwards reports to Tune);
    `stages_root`: a sweep directory whose shared training stages the workers start from.
    """
    opts = plan.options
    if plan.previous is not None and plan.previous.get("final"):  # e.g. the driver died after training ended
        log(f"run '{plan.name}' already finished; using its {describe_checkpoint(plan.previous)} in {plan.where}")
        return _outcome_from_storage(plan)
    check_writable(plan.storage)
    where = connect(opts.address)
    shape = WorkerShape(opts.cpus_per_worker, opts.gpus_per_worker)
    check_capacity(opts.workers, shape, cluster_nodes(), where)
    log(f"Ray Train run '{plan.name}': {opts.workers} worker(s) on {where}, checkpoints in {plan.where}")
    if plan.previous is not None:
        log(f"resuming run '{plan.name}' from its checkpoint of {describe_checkpoint(plan.previous)}")
    spec = WorkerSpec(cfg.model_dump(mode="json"), str(Path(data_root).resolve()), absolute_uri(tracking_uri), mlflow_run_id,
                      phases=worker_phases, stages_root=stages_root, dataset_digest=dataset_digest or "")
    started = time.perf_counter()
    with CapacityWatch(opts.workers, shape, where, log):
        result = _fit(_trainer(spec, plan, callbacks), plan)
    outcome = _outcome_from_checkpoint(result.checkpoint, plan)
    outcome.fit_seconds = time.perf_counter() - started
    outcome.resumed_from = plan.previous
    return outcome


def _trainer(spec: WorkerSpec, plan: RayRunPlan, callbacks: list | None = None):
    import ray.train
    from ray.train.torch import TorchTrainer

    opts = plan.options
    resources = {"CPU": opts.cpus_per_worker}
    if opts.gpus_per_worker:
        resources["GPU"] = opts.gpus_per_worker
    return TorchTrainer(
        train_worker,
        train_loop_config=spec.to_config(),
        scaling_config=ray.train.ScalingConfig(
            num_workers=opts.workers, use_gpu=opts.gpus_per_worker > 0, resources_per_worker=resources
        ),
        run_config=ray.train.RunConfig(
            name=plan.name,
            storage_path=plan.storage.path,
            storage_filesystem=plan.storage.filesystem,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=opts.checkpoints_to_keep),
            failure_config=ray.train.FailureConfig(max_failures=opts.max_failures),
            callbacks=callbacks or None,
            # Ray Train's own INFO lines (every report's repr, "Checkpoint successfully created" …) would drown
            # dcad's progress; warnings and errors still show.
            logging_config=ray.train.LoggingConfig(log_level="WARNING"),
        ),
    )


def _fit(trainer, plan: RayRunPlan):
    import ray.train

    try:
        result = trainer.fit()
    except ray.train.TrainingFailedError as err:
        raise RayTrainingError(
            f"training failed after {plan.options.max_failures} retries ({_failure_summary(err)}); "
            f"checkpoints are in {plan.where}: run the same command with --name {plan.name} to resume"
        ) from None
    if result.checkpoint is None:
        raise RayTrainingError(f"run '{plan.name}' ended without a checkpoint in {plan.where}")
    return result


def _failure_summary(err: BaseException) -> str:
    failures = getattr(err, "worker_failures", None) or {}
    if failures:
        rank, exc = sorted(failures.items())[0]
        return f"rank {rank}: {_last_line(exc)}"
    cause = getattr(err, "controller_failure", None)
    return _last_line(cause if cause is not None else err)


def _last_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = lines[-1] if lines else type(exc).__name__
    return redact(text)[:300]


def _outcome_from_checkpoint(checkpoint, plan: RayRunPlan) -> RayTrainOutcome:
    with checkpoint.as_directory() as directory:
        return _load_final(Path(directory), plan)


def _outcome_from_storage(plan: RayRunPlan) -> RayTrainOutcome:
    import pyarrow.fs

    tmp = Path(tempfile.mkdtemp(prefix="dcad-final-"))
    try:
        source = plan.storage.join(plan.name, FINAL_DIR)
        pyarrow.fs.copy_files(source, str(tmp), source_filesystem=plan.storage.arrow_fs(),
                              destination_filesystem=pyarrow.fs.LocalFileSystem())
        return _load_final(tmp, plan)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _load_final(directory: Path, plan: RayRunPlan) -> RayTrainOutcome:
    from dcad.core.model.model_dir import load_model

    meta = read_meta(directory)
    if not meta or not meta.get("final") or not (directory / MODEL_DIR).is_dir():
        raise RayTrainingError(f"{plan.where}: the last checkpoint is not a finished model ({META_FILE} says {meta})")
    problem = missing_files(directory, meta)
    if problem:
        raise RayTrainingError(f"{plan.where}: the final checkpoint is incomplete ({problem}); run again with another --name")
    model = load_model(directory / MODEL_DIR)
    return RayTrainOutcome(model, dict(meta.get("val_metrics") or {}), list(meta.get("history") or []))


__all__ = [
    "RayRunPlan",
    "RayTrainOptions",
    "RayTrainOutcome",
    "RayTrainingError",
    "latest_checkpoint_meta",
    "plan_run",
    "total_epochs",
    "train_on_ray",
]
