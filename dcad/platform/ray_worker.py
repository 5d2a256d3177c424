"""What a Ray Train worker (and a one-worker sweep trial) runs: `train_drdc`, one report and checkpoint per epoch
(layout: docs/design.md)."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

META_FILE = "dcad_checkpoint.json"
MANIFEST_KEY = "files"  # in META_FILE: {relative path: bytes} of every other file of the checkpoint
FINAL_DIR = "final"
MODEL_DIR = "model"
PLACEMENT_GROUP_KEY = "placement_group"


@dataclass
class WorkerSpec:
    """Everything a worker needs, sent as Ray's `train_loop_config` (plain values only)."""

    cfg: dict[str, Any]
    data_root: str
    tracking_uri: str | None = None
    mlflow_run_id: str | None = None
    phases: bool = True  # print each training phase (a sweep reports progress itself)
    stages_root: str | None = None  # a sweep directory whose shared stages (`dcad.platform.stage_store`) to use
    dataset_digest: str = ""


def read_meta(directory: Path) -> dict[str, Any] | None:
    try:
        return json.loads((Path(directory) / META_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def describe_checkpoint(meta: dict[str, Any]) -> str:
    if meta.get("final"):
        return f"final checkpoint (epoch {meta.get('epoch')}/{meta.get('total_epochs')})"
    return (f"epoch {meta.get('epoch')}/{meta.get('total_epochs')} "
            f"({meta.get('stage')} epoch {meta.get('stage_epoch')}/{meta.get('stage_epochs')})")


def log(message: str) -> None:
    """A line in the driver's log (Ray forwards worker output, prefixed with the worker's pid)."""
    print(f"dcad: {message}", flush=True)


def worker_temp_dir(kind: str) -> Path:
    """A fresh `dcad-KIND-PID-…` temp directory, after removing those of `kind` whose process is gone."""
    import psutil

    pattern = re.compile(rf"dcad-{re.escape(kind)}-(\d+)-")
    for old in Path(tempfile.gettempdir()).glob(f"dcad-{kind}-*"):
        match = pattern.match(old.name)
        if match and not psutil.pid_exists(int(match.group(1))):
            shutil.rmtree(old, ignore_errors=True)
    return Path(tempfile.mkdtemp(prefix=f"dcad-{kind}-{os.getpid()}-"))


def file_sizes(directory: Path) -> dict[str, int]:
    """{relative path: bytes} of every file below `directory` but the metadata."""
    return {p.relative_to(directory).as_posix(): p.stat().st_size for p in sorted(Path(directory).rglob("*"))
            if p.is_file() and p.name != META_FILE}


def missing_files(directory: Path, meta: dict[str, Any]) -> str | None:
    """The first file the metadata lists that is absent from `directory` or of another size, or None."""
    found = file_sizes(directory)
    for name, size in (meta.get(MANIFEST_KEY) or {}).items():  # no list: written before checkpoints had one
        if name not in found:
            return f"{name} is missing"
        if found[name] != size:
            return f"{name} has {found[name]} bytes, expected {size}"
    return None


@contextmanager
def restored_checkpoint(checkpoint, kind: str, warn: Callable[[str], None]) -> Iterator[tuple[Path, dict | None]]:
    """A `worker_temp_dir(kind)`, removed afterwards, holding `checkpoint` and its metadata (None: absent or incomplete)."""
    local = worker_temp_dir(kind)
    try:
        meta = None
        if checkpoint is not None:
            checkpoint.to_directory(str(local))
            meta = read_meta(local)
            problem = missing_files(local, meta) if meta is not None else None
            if problem is not None:
                warn(f"the checkpoint of {describe_checkpoint(meta)} is incomplete ({problem}): training from the start")
                shutil.rmtree(local, ignore_errors=True)
                local.mkdir()
                meta = None
        yield local, meta
    finally:
        shutil.rmtree(local, ignore_errors=True)


def upload_checkpoint(checkpoint, dir_name: str):
    """Ray Train's `checkpoint_upload_fn`: the files streamed to the run's storage, the metadata last, raising if
    any upload fails (Ray's default upload returned normally from an S3 upload whose connection was cut)."""
    import ray.train

    from dcad.platform.storage import upload_directory

    storage = ray.train.get_context().get_storage()  # DeveloperAPI: the RunConfig's filesystem and run directory
    destination = f"{storage.experiment_fs_path.rstrip('/')}/{dir_name}"
    upload_directory(storage.storage_filesystem, Path(checkpoint.path), destination, last=META_FILE)
    return ray.train.Checkpoint(destination, filesystem=storage.storage_filesystem)


Report = Callable[[dict, "Path | None", str], None]  # (metrics, checkpoint directory or None, checkpoint name)


@dataclass
class EpochReporter:
    """Each epoch as MLflow metrics (`tracker`) and a Ray report with, from the chief, a checkpoint of `local_dir`."""

    cfg: Any
    local_dir: Path
    report: Report
    mlflow_run_id: str | None = None
    tracker: Any = None
    chief: bool = True
    history: list[dict] = field(default_factory=list)
    extra: Callable[[], dict] = dict  # more metrics for every report

    def __call__(self, report) -> None:
        epoch = report.epoch + (self.cfg.base_epochs if report.stage == "refiner" else 0)  # across both stages
        seconds = float(report.extra.get("seconds", float("nan")))
        self.history.append({"stage": report.stage, "epoch": report.epoch, "global_epoch": epoch, **report.metrics,
                             "epoch_seconds": seconds})
        if self.tracker is not None:  # logged once even when the epoch runs again after a restart
            self.tracker.log_epoch(report)
        metrics = {"epoch": epoch, "stage": report.stage, "stage_epoch": report.epoch, **report.metrics,
                   "epoch_seconds": seconds, **self.extra()}
        meta = {"epoch": epoch, "total_epochs": self.cfg.total_epochs, "stage": report.stage, "stage_epoch": report.epoch,
                "stage_epochs": report.epochs, "final": False}
        self.checkpoint(metrics, meta, f"epoch_{epoch:04d}", self.local_dir)

    def final(self, model, val_metrics: dict[str, float]) -> None:
        """The last report: the model directory under `model/` with the validation metrics."""
        from dcad.core.model.model_dir import save_model

        epoch = self.cfg.total_epochs
        meta = {"epoch": epoch, "total_epochs": epoch, "final": True, "val_metrics": val_metrics}
        with tempfile.TemporaryDirectory(prefix="dcad-final-") as tmp:
            if self.chief:
                save_model(model, Path(tmp) / MODEL_DIR)
            self.checkpoint({"epoch": epoch, "stage": FINAL_DIR, **val_metrics}, meta, FINAL_DIR, Path(tmp))

    def checkpoint(self, metrics: dict, meta: dict, name: str, files: Path) -> None:
        if not self.chief:
            self.report(metrics, None, name)
            return
        staging = worker_temp_dir("ckpt")
        try:
            shutil.copytree(files, staging, dirs_exist_ok=True)
            meta = {**meta, "mlflow_run_id": self.mlflow_run_id, "history": self.history, MANIFEST_KEY: file_sizes(staging)}
            (staging / META_FILE).write_text(json.dumps(meta, allow_nan=True))
            self.report(metrics, staging, name)
        finally:
            shutil.rmtree(staging, ignore_errors=True)


def train_reporting(cfg, splits, reporter: EpochReporter, meta: dict | None, *, device, stages=None, start=None,
                    role=None, on_phase=None):
    """`train_drdc` from the checkpoint laid out in `reporter.local_dir` (`meta`) or from `start` (default: the best
    of `stages`); publishes what the chief trains to `stages`. Returns the model and its validation metrics."""
    from dcad.train.pipeline import TrainHooks, train_drdc
    from dcad.train.shared_stages import TrainedWeights

    if start is None and stages is not None:
        start = stages.best_start(cfg)
    shared = (start.weights or start.base) if start is not None else None
    if shared is not None and meta is None:  # the curves of the stages this training starts from
        reporter.history[:0] = list(shared.history)
    hooks = TrainHooks(on_epoch=reporter, on_phase=on_phase)
    if stages is not None and reporter.chief:
        hooks.on_shared = lambda stage, result: stages.publish(stage, cfg, result)
    model, val_metrics = train_drdc(cfg, splits, device=device, checkpoint_dir=reporter.local_dir, resume=meta is not None,
                                    hooks=hooks, role=role, start=start)
    if stages is not None and reporter.chief and (start is None or start.weights is None):
        stages.publish("weights", cfg, TrainedWeights.of(model, reporter.history))
    return model, val_metrics


def stage_store(root: str, digest: str):
    """The sweep's shared training stages under `root` (a path or s3:// URI)."""
    from dcad.platform.stage_store import StageStore
    from dcad.platform.storage import resolve_storage

    return StageStore(resolve_storage(root, Path(root)), digest)


def placement_group_of_this_worker() -> dict[str, str]:
    """{PLACEMENT_GROUP_KEY: id} of the workers' placement group (for `dcad.platform.sweep.cleanup`), or {}."""
    import ray.util

    group = ray.util.get_current_placement_group()
    return {PLACEMENT_GROUP_KEY: group.id.hex()} if group is not None else {}


def _report_to_train(metrics: dict, directory: Path | None, name: str) -> None:
    import ray.train

    checkpoint = ray.train.Checkpoint.from_directory(str(directory)) if directory is not None else None
    ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=name, checkpoint_upload_fn=upload_checkpoint)


def _wrap_ddp(module):
    import ray.train
    import ray.train.torch
    import torch

    wrapped = ray.train.torch.prepare_model(module, move_to_device=False)
    context = ray.train.get_context()
    if context.get_world_rank() == 0 and isinstance(wrapped, torch.nn.parallel.DistributedDataParallel):
        log(f"{type(module).__name__} wrapped in DistributedDataParallel across {context.get_world_size()} workers")
    return wrapped


def train_worker(config: dict[str, Any]) -> None:
    """The Ray Train worker function (`TorchTrainer(train_worker, train_loop_config=asdict(spec))`)."""
    import ray.train
    import ray.train.torch

    from dcad.core.config import DCADConfig
    from dcad.core.data import build_splits
    from dcad.core.errors import DcadError
    from dcad.platform.tracking import TrackingOptions, start_run
    from dcad.platform.training import metric_history
    from dcad.train.pipeline import TrainRole

    # Ray Train logs every report at INFO through a logger outside `ray.train` (RunConfig's LoggingConfig misses it)
    logging.getLogger().setLevel(logging.WARNING)
    spec = WorkerSpec(**config)
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    chief = rank == 0
    say = log if chief else lambda _: None  # only rank 0 prints
    cfg = DCADConfig.from_dict(spec.cfg, "train_loop_config")
    with restored_checkpoint(ray.train.get_checkpoint(), f"rank{rank}", say) as (local_dir, meta):
        if meta is not None and meta.get("final"):
            say(f"nothing to train: the run already has its {describe_checkpoint(meta)}")
            return
        if meta is not None:
            say(f"resuming from the checkpoint of {describe_checkpoint(meta)}")
        spec.mlflow_run_id = (meta or {}).get("mlflow_run_id") or spec.mlflow_run_id
        reporter = EpochReporter(cfg, local_dir, _report_to_train, spec.mlflow_run_id, chief=chief,
                                 history=list((meta or {}).get("history", [])), extra=placement_group_of_this_worker)
        if chief and spec.tracking_uri and spec.mlflow_run_id:  # the MLflow run the driver opened
            try:
                reporter.tracker = start_run(TrackingOptions(tracking_uri=spec.tracking_uri), "train", run_id=spec.mlflow_run_id)
            except DcadError as err:
                log(f"MLflow logging off on this worker ({err})")
            if meta is not None and reporter.tracker is not None:  # epochs the checkpoint holds but MLflow missed
                reporter.tracker.log_history(metric_history(reporter.history))
        stages = stage_store(spec.stages_root, spec.dataset_digest) if spec.stages_root else None
        model, val_metrics = train_reporting(
            cfg, build_splits(Path(spec.data_root), cfg.data), reporter, meta, device=ray.train.torch.get_device(),
            stages=stages, role=TrainRole(chief=chief, wrap_module=_wrap_ddp if world > 1 else None),
            on_phase=say if spec.phases else None)
        reporter.final(model, val_metrics)
