"""What every Ray Train worker runs: `train_drdc` under DDP, one `ray.train.report` per epoch.

Checkpoints (written by rank 0, one directory per report, named by the *global* epoch across both
stages, e.g. `epoch_0003`) hold the files of `dcad.train.pipeline` (`base.pt`, `refiner.pt`) and
`dcad_checkpoint.json` (epoch numbers, the history so far, the MLflow run id and the size of every other
file, checked when the checkpoint is restored). The last report is
`final/`: the model directory under `model/` plus the validation metrics. A worker given a
checkpoint by Ray (after a failure, or a driver restart with the same run name) lays it out locally
and lets `train_drdc(resume=True)` continue from it: a finished stage is skipped, the current one
resumes from its epoch.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

META_FILE = "dcad_checkpoint.json"
MANIFEST_KEY = "files"  # in META_FILE: {relative path: bytes} of every other file of the checkpoint
FINAL_DIR = "final"
MODEL_DIR = "model"
LOG_PREFIX = "dcad:"


def epoch_dir(global_epoch: int) -> str:
    return f"epoch_{global_epoch:04d}"


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

    def to_config(self) -> dict[str, Any]:
        return {"spec": self.__dict__.copy()}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "WorkerSpec":
        return cls(**config["spec"])


def stage_offsets(cfg) -> dict[str, int]:
    """Global epoch of each stage's epoch 0: the refiner's epochs follow the base branch's."""
    return {"base": 0, "refiner": cfg.train.base.epochs}


def total_epochs(cfg) -> int:
    from dcad.train.shared_stages import uses_refiner

    return cfg.train.base.epochs + (cfg.train.refiner.epochs if uses_refiner(cfg) else 0)


def read_meta(directory: Path) -> dict[str, Any] | None:
    path = Path(directory) / META_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def describe_checkpoint(meta: dict[str, Any]) -> str:
    if meta.get("final"):
        return f"final checkpoint (epoch {meta.get('epoch')}/{meta.get('total_epochs')})"
    return (
        f"epoch {meta.get('epoch')}/{meta.get('total_epochs')} "
        f"({meta.get('stage')} epoch {meta.get('stage_epoch')}/{meta.get('stage_epochs')})"
    )


def log(message: str) -> None:
    """A line in the driver's log (Ray forwards worker output, prefixed with the worker's pid)."""
    print(f"{LOG_PREFIX} {message}", flush=True)


@dataclass
class _Reporter:
    """Turns the pipeline's epoch reports into Ray reports (and MLflow metrics on rank 0)."""

    rank: int
    cfg: Any
    local_dir: Path
    mlflow_run_id: str | None
    tracker: Any = None
    history: list[dict] = field(default_factory=list)

    @property
    def chief(self) -> bool:
        return self.rank == 0

    def on_epoch(self, report) -> None:
        import ray.train

        epoch = stage_offsets(self.cfg)[report.stage] + report.epoch
        seconds = float(report.extra.get("seconds", float("nan")))
        metrics = {"epoch": epoch, "stage": report.stage, "stage_epoch": report.epoch, **report.metrics, "epoch_seconds": seconds,
                   **placement_group_of_this_worker()}
        self.history.append({"stage": report.stage, "epoch": report.epoch, "global_epoch": epoch, **report.metrics,
                             "epoch_seconds": seconds})
        if not self.chief:
            ray.train.report(metrics, checkpoint=None)
            return
        self._report(metrics, self._epoch_meta(report, epoch), epoch_dir(epoch), files=self.local_dir)
        if self.tracker is not None:  # after its checkpoint: an epoch lost with a worker is not logged twice
            self.tracker.log_epoch(report)

    def log_checkpointed_epochs(self) -> None:
        """On resume: epochs the checkpoint holds but MLflow missed (a worker died between the two)."""
        if self.tracker is not None:
            self.tracker.log_history([{k: v for k, v in h.items() if k not in ("global_epoch", "epoch_seconds")}
                                      for h in self.history])

    def _epoch_meta(self, report, epoch: int) -> dict[str, Any]:
        return {
            "epoch": epoch,
            "total_epochs": total_epochs(self.cfg),
            "stage": report.stage,
            "stage_epoch": report.epoch,
            "stage_epochs": report.epochs,
            "final": False,
            "mlflow_run_id": self.mlflow_run_id,
            "history": self.history,
        }

    def final(self, model, val_metrics: dict[str, float]) -> None:
        import ray.train

        epoch = total_epochs(self.cfg)
        metrics = {"epoch": epoch, "stage": FINAL_DIR, **val_metrics}
        if not self.chief:
            ray.train.report(metrics, checkpoint=None)
            return
        from dcad.core.model.model_dir import save_model

        meta = {
            "epoch": epoch,
            "total_epochs": epoch,
            "final": True,
            "mlflow_run_id": self.mlflow_run_id,
            "history": self.history,
            "val_metrics": val_metrics,
        }
        with tempfile.TemporaryDirectory(prefix="dcad-final-") as tmp:
            save_model(model, Path(tmp) / MODEL_DIR)
            self._report(metrics, meta, FINAL_DIR, files=Path(tmp))

    def _report(self, metrics: dict, meta: dict, name: str, files: Path) -> None:
        """Copy `files` and the metadata (with the size of every file) into a fresh directory and report it as
        the checkpoint `name`, uploaded by `upload_checkpoint`."""
        import ray.train

        staging = worker_temp_dir("ckpt")
        try:
            shutil.copytree(files, staging, dirs_exist_ok=True)
            meta = {**meta, MANIFEST_KEY: file_sizes(staging)}
            (staging / META_FILE).write_text(json.dumps(meta, allow_nan=True))
            checkpoint = ray.train.Checkpoint.from_directory(str(staging))
            ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=name,
                             checkpoint_upload_fn=upload_checkpoint)
        finally:
            shutil.rmtree(staging, ignore_errors=True)


def worker_temp_dir(kind: str) -> Path:
    """A fresh `dcad-KIND-PID-…` directory in the temp dir, after removing those of `kind` whose process is
    gone (a worker killed by a node loss or a fault never runs its cleanup)."""
    from dcad.platform.stack.procs import pid_alive

    pattern = re.compile(rf"dcad-{re.escape(kind)}-(\d+)-")
    for old in Path(tempfile.gettempdir()).glob(f"dcad-{kind}-*"):
        match = pattern.match(old.name)
        if match and not pid_alive(int(match.group(1))):
            shutil.rmtree(old, ignore_errors=True)
    return Path(tempfile.mkdtemp(prefix=f"dcad-{kind}-{os.getpid()}-"))


def file_sizes(directory: Path) -> dict[str, int]:
    """{relative path: bytes} of every file below `directory` but the metadata."""
    return {p.relative_to(directory).as_posix(): p.stat().st_size for p in sorted(Path(directory).rglob("*"))
            if p.is_file() and p.name != META_FILE}


def upload_checkpoint(checkpoint, dir_name: str):
    """Ray Train's `checkpoint_upload_fn`: the checkpoint's files streamed to the run's storage, the metadata
    last, raising if any upload fails (then Ray registers no checkpoint and the worker group restarts from
    the previous one). Ray's default upload is `pyarrow.fs.copy_files`, which returned normally from an S3
    upload whose connection was cut (measured: `dcad.platform.storage.upload_file`)."""
    import ray.train

    from dcad.platform.storage import upload_directory

    storage = ray.train.get_context().get_storage()  # DeveloperAPI: the RunConfig's filesystem and run directory
    destination = f"{storage.experiment_fs_path.rstrip('/')}/{dir_name}"
    upload_directory(storage.storage_filesystem, Path(checkpoint.path), destination, last=META_FILE)
    return ray.train.Checkpoint(destination, filesystem=storage.storage_filesystem)


def missing_files(directory: Path, meta: dict[str, Any]) -> str | None:
    """What is missing from a checkpoint laid out in `directory` (the first file absent or of another size
    than its metadata lists), or None when it is whole."""
    found = file_sizes(directory)
    for name, size in (meta.get(MANIFEST_KEY) or {}).items():  # no list: written before checkpoints had one
        if name not in found:
            return f"{name} is missing"
        if found[name] != size:
            return f"{name} has {found[name]} bytes, expected {size}"
    return None


PLACEMENT_GROUP_KEY = "placement_group"


def placement_group_of_this_worker() -> dict[str, str]:
    """{PLACEMENT_GROUP_KEY: id} of the worker group's placement group (a sweep removes it if Tune stops the
    trial: `dcad.platform.sweep.cleanup`), or {} outside one."""
    import ray.util

    group = ray.util.get_current_placement_group()
    return {PLACEMENT_GROUP_KEY: group.id.hex()} if group is not None else {}


def _stage_store(spec: WorkerSpec):
    """The sweep's shared stages this run starts from and publishes to (None outside a sweep)."""
    if not spec.stages_root:
        return None
    from dcad.platform.stage_store import StageStore
    from dcad.platform.storage import resolve_storage

    return StageStore(resolve_storage(spec.stages_root, Path(spec.stages_root)), spec.dataset_digest)


def _restore(local_dir: Path) -> dict[str, Any] | None:
    """Download the checkpoint Ray hands this worker (if any) into `local_dir`; its metadata."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return None
    checkpoint.to_directory(str(local_dir))
    meta = read_meta(local_dir)
    problem = missing_files(local_dir, meta) if meta is not None else None
    if problem is None:
        return meta
    if ray.train.get_context().get_world_rank() == 0:
        log(f"the checkpoint of {describe_checkpoint(meta)} is incomplete ({problem}): training from the start")
    shutil.rmtree(local_dir, ignore_errors=True)
    local_dir.mkdir()
    return None


def _open_tracker(spec: WorkerSpec):
    """Rank 0's handle on the MLflow run the driver opened (None when tracking is off or unreachable)."""
    if not spec.tracking_uri or not spec.mlflow_run_id:
        return None
    from dcad.core.errors import DcadError
    from dcad.platform.tracking import TrackingOptions, start_run

    try:
        return start_run(TrackingOptions(tracking_uri=spec.tracking_uri), "train", run_id=spec.mlflow_run_id)
    except DcadError as err:
        log(f"MLflow logging off on this worker ({err})")
        return None


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
    """The Ray Train worker function (`TorchTrainer(train_worker, train_loop_config=spec.to_config())`)."""
    import ray.train
    import ray.train.torch

    from dcad.core.config import DCADConfig
    from dcad.core.data import build_splits
    from dcad.train.pipeline import TrainHooks, TrainRole, train_drdc

    # Ray Train logs every report's full repr at INFO through a logger named after its source file (outside
    # `ray.train`, so RunConfig's LoggingConfig does not reach it): the worker's root level keeps it quiet.
    logging.getLogger().setLevel(logging.WARNING)
    spec = WorkerSpec.from_config(config)
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    cfg = DCADConfig.from_dict(spec.cfg, "train_loop_config")
    local_dir = worker_temp_dir(f"rank{rank}")
    try:
        meta = _restore(local_dir)
        if meta is not None and meta.get("final"):
            if rank == 0:
                log(f"nothing to train: the run already has its {describe_checkpoint(meta)}")
            return
        if meta is not None and rank == 0:
            log(f"resuming from the checkpoint of {describe_checkpoint(meta)}")
        run_id = (meta or {}).get("mlflow_run_id") or spec.mlflow_run_id
        spec.mlflow_run_id = run_id
        reporter = _Reporter(rank, cfg, local_dir, run_id, history=list((meta or {}).get("history", [])))
        if rank == 0:
            reporter.tracker = _open_tracker(spec)
            if meta is not None:
                reporter.log_checkpointed_epochs()
        hooks = TrainHooks(on_epoch=reporter.on_epoch, on_phase=(lambda name: log(name)) if rank == 0 and spec.phases else None)
        role = TrainRole(chief=rank == 0, wrap_module=_wrap_ddp if world > 1 else None)
        splits = build_splits(Path(spec.data_root), cfg.data)
        stages = _stage_store(spec)
        start = stages.best_start(cfg) if stages is not None else None
        if stages is not None and rank == 0:
            hooks.on_shared = lambda stage, result: stages.publish(stage, cfg, result)
        shared = (start.weights or start.base) if start is not None else None
        if shared is not None and not meta:  # the curves of the stages this run starts from
            reporter.history[:0] = list(shared.history)
        model, val_metrics = train_drdc(
            cfg,
            splits,
            device=ray.train.torch.get_device(),
            checkpoint_dir=local_dir,
            resume=meta is not None,
            hooks=hooks,
            role=role,
            start=start,
        )
        if stages is not None and rank == 0 and (start is None or start.weights is None):
            from dcad.train.shared_stages import TrainedWeights

            stages.publish("weights", cfg, TrainedWeights.of(model, hooks.history))
        reporter.final(model, val_metrics)
    finally:
        shutil.rmtree(local_dir, ignore_errors=True)
