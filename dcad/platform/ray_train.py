"""`dcad train --workers N`: DRDC training on N Ray Train workers (`ray_worker`), resumable by name (docs/design.md)."""

from __future__ import annotations

import json
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from dcad.platform.errors import PlatformError
from dcad.platform.ray_cluster import CapacityWatch, WorkerShape, check_capacity, check_reachable, cluster_nodes, connect
from dcad.platform.mlflow_store import absolute_uri
from dcad.platform.ray_worker import FINAL_DIR, META_FILE, MODEL_DIR, WorkerSpec, describe_checkpoint, missing_files, read_meta, train_worker
from dcad.platform.secrets import redact
from dcad.platform.storage import StorageLocation, check_writable, read_text, resolve_storage

SNAPSHOT_FILE = "checkpoint_manager_snapshot.json"  # written by Ray Train V2 next to the checkpoints
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._=-]{0,127}$")


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
        """What the CLI's own checks (--workers ≥ 1, --gpus-per-worker ≥ 0) leave."""
        if self.cpus_per_worker <= 0:
            raise PlatformError(f"--cpus-per-worker {self.cpus_per_worker:g}: must be positive")
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
    """A trained model (of `train_on_ray` or of a sweep trial) and how it was trained."""

    model: Any  # DRDC
    val_metrics: dict[str, float]
    history: list[dict] = field(default_factory=list)
    fit_seconds: float = 0.0
    resumed_from_epoch: float = 0.0
    started_from: str = "nothing"  # the shared stage a sweep trial started from
    train_span: tuple[float, float] | None = None  # wall-clock start and end of `train_drdc` (one-worker trials)


def plan_run(options: RayTrainOptions, output: Path) -> RayRunPlan:
    """Resolve storage and name, check what is cheap to check, read that name's latest checkpoint; writes nothing."""
    options.validate()
    storage = resolve_storage(options.storage, Path(output).resolve() / "checkpoints")
    check_reachable(options.address)
    if storage.is_s3 or not Path(storage.path).is_relative_to(Path(output).resolve()):
        check_writable(storage)
    name = options.name or "dcad-train-" + time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    return RayRunPlan(options, name, storage, latest_checkpoint_meta(storage, name))


def latest_checkpoint_meta(storage: StorageLocation, name: str) -> dict[str, Any] | None:
    """Metadata of the checkpoint Ray resumes STORAGE/NAME from (the latest complete one, in Ray's snapshot), or None."""
    try:
        snapshot = json.loads(read_text(storage, storage.join(name, SNAPSHOT_FILE)) or "null")
        directory = snapshot["latest_checkpoint_result"]["checkpoint_dir_name"]
        meta = json.loads(read_text(storage, storage.join(name, directory, META_FILE)) or "null") if directory else None
    except (KeyError, TypeError, ValueError):
        return None
    return {**meta, "checkpoint_dir": directory} if isinstance(meta, dict) else None


def train_on_ray(cfg, data_root: Path, plan: RayRunPlan, *, tracking_uri: str | None = None, mlflow_run_id: str | None = None,
                 log: Callable[[str], None] = print, callbacks: list | None = None, worker_phases: bool = True,
                 stages_root: str | None = None, dataset_digest: str | None = None) -> RayTrainOutcome:
    """Run (or continue) the training of `plan`: the trained model. `stages_root`: a sweep directory of shared stages."""
    import ray.train

    opts = plan.options
    if plan.previous is not None and plan.previous.get("final"):  # e.g. the driver died after training ended
        log(f"run '{plan.name}' already finished; using its {describe_checkpoint(plan.previous)} in {plan.where}")
        return _load_final(ray.train.Checkpoint(plan.storage.join(plan.name, FINAL_DIR), plan.storage.arrow_fs()), plan)
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
        result = _fit(spec, plan, callbacks)
    outcome = _load_final(result.checkpoint, plan)
    outcome.fit_seconds = time.perf_counter() - started
    return outcome


def _fit(spec: WorkerSpec, plan: RayRunPlan, callbacks: list | None):
    """The `TorchTrainer` run of `plan`; its result (RayTrainingError when it fails for good)."""
    import ray.train
    from ray.train.torch import TorchTrainer

    opts = plan.options
    resources = {"CPU": opts.cpus_per_worker, **({"GPU": opts.gpus_per_worker} if opts.gpus_per_worker else {})}
    trainer = TorchTrainer(
        train_worker,
        train_loop_config=asdict(spec),
        scaling_config=ray.train.ScalingConfig(num_workers=opts.workers, use_gpu=opts.gpus_per_worker > 0,
                                               resources_per_worker=resources),
        run_config=ray.train.RunConfig(
            name=plan.name,
            storage_path=plan.storage.path,
            storage_filesystem=plan.storage.filesystem,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=opts.checkpoints_to_keep),
            failure_config=ray.train.FailureConfig(max_failures=opts.max_failures),
            callbacks=callbacks or None,
            logging_config=ray.train.LoggingConfig(log_level="WARNING"),  # Ray's INFO lines would drown dcad's progress
        ),
    )
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
    """The failed worker (or the controller) and the last line of its error: where Ray puts the exception itself."""
    failures = sorted((getattr(err, "worker_failures", None) or {}).items())
    cause = getattr(err, "controller_failure", None)
    exc = failures[0][1] if failures else (cause if cause is not None else err)
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = redact(lines[-1] if lines else type(exc).__name__)[:300]
    return f"rank {failures[0][0]}: {text}" if failures else text


def _load_final(checkpoint, plan: RayRunPlan) -> RayTrainOutcome:
    """The model, validation metrics and history of the run's `final` checkpoint (RayTrainingError if incomplete)."""
    from dcad.core.model.model_dir import load_model

    with checkpoint.as_directory() as local:
        directory = Path(local)
        meta = read_meta(directory)
        if not meta or not meta.get("final") or not (directory / MODEL_DIR).is_dir():
            raise RayTrainingError(f"{plan.where}: the last checkpoint is not a finished model ({META_FILE} says {meta})")
        problem = missing_files(directory, meta)
        if problem:
            raise RayTrainingError(f"{plan.where}: the final checkpoint is incomplete ({problem}); run again with another --name")
        model = load_model(directory / MODEL_DIR)
    return RayTrainOutcome(model, dict(meta.get("val_metrics") or {}), list(meta.get("history") or []),
                           resumed_from_epoch=float((plan.previous or {}).get("epoch", 0)))
