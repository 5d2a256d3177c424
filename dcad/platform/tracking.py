"""MLflow run tracking for `dcad train`, `dcad eval --log`, `dcad log`, sweep trials and pipelines: a `RunTracker`
owns one MLflow run (what a run holds and what happens when the store goes away: docs/cluster.md §4)."""

from __future__ import annotations

import json
import math
import os
import re
import socket
import subprocess
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlflow
from mlflow.entities import LoggedModelStatus, Metric, Param, RunTag

from dcad import __version__
from dcad.core.model.model_dir import CONFIG_FILE, read_metadata
from dcad.platform.errors import TrackingError, TrackingLostError, describe
from dcad.platform.mlflow_store import DEFAULT_EXPERIMENT, get_or_create_experiment, open_store, run_link, use_store, who
from dcad.platform.secrets import redact, redact_mapping
from dcad.platform.tracking_buffer import WriteBuffer, store_wait_s

REPORT_DIR = "report"
ORPHANED_TAG = "dcad.orphaned"
PARAM_VALUE_LIMIT = 6000
SQLITE_ATTEMPTS = 3  # concurrent processes on one sqlite store can meet a lock or a migration race
_TRANSIENT = ("database is locked", "already exists", "operationalerror")
_KEY_UNSAFE = re.compile(r"[^A-Za-z0-9_\-. /]")


@dataclass
class TrackingOptions:
    """Where a run goes: store, experiment, run name, parent run, extra tags."""

    tracking_uri: str | None = None
    experiment: str = DEFAULT_EXPERIMENT
    run_name: str | None = None
    parent_run_id: str | None = None
    tags: dict[str, str] = field(default_factory=dict)


def metric_key(name: str) -> str:
    """MLflow-safe metric/param key (alphanumerics, `_ - . / space`)."""
    return _KEY_UNSAFE.sub("_", name)


def git_commit() -> str | None:
    """The commit of the dcad source checkout, or None (installed package, no git, no commit yet)."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parents[2],
                             capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    sha = out.stdout.strip()
    return sha if out.returncode == 0 and re.fullmatch(r"[0-9a-f]{40}", sha) else None


def _writer_tags() -> dict[str, str]:
    """Which process writes a run: a RUNNING run whose writer is gone was orphaned (SIGKILL, OOM)."""
    return {"dcad.host": socket.gethostname(), "dcad.pid": str(os.getpid())}


def start_run(options: TrackingOptions, kind: str, run_id: str | None = None) -> "RunTracker":
    """Check the store (TrackingError if unusable), then create a run (or reopen `run_id`)."""
    uri, client = open_store(options.tracking_uri)
    attempts = SQLITE_ATTEMPTS if uri.startswith("sqlite:") else 1
    for attempt in range(1, attempts + 1):
        try:
            return RunTracker(uri, client, *_open_run(uri, client, options, kind, run_id))
        except TrackingError:
            raise
        except Exception as err:  # MlflowException, requests errors, sqlite errors
            if attempt == attempts or not any(word in str(err).lower() for word in _TRANSIENT):
                raise TrackingError(f"tracking store {uri}: cannot start a run ({describe(err)})") from None
            time.sleep(attempt)


def _open_run(uri: str, client, options: TrackingOptions, kind: str, run_id: str | None) -> tuple[str, str]:
    """(run id, experiment id) of a new run, or of `run_id` continued by this process."""
    if run_id is not None:
        run = client.get_run(run_id)
        if run.info.status != "RUNNING":
            client.update_run(run_id, status="RUNNING")
        client.log_batch(run_id, tags=[RunTag(k, v) for k, v in _writer_tags().items()])
        if ORPHANED_TAG in run.data.tags:  # ended by a resume that found it orphaned; continued now
            client.delete_tag(run_id, ORPHANED_TAG)
        return run_id, run.info.experiment_id
    experiment_id = get_or_create_experiment(client, options.experiment, uri)
    commit = git_commit()
    tags = {**_writer_tags(), "dcad.version": __version__, "dcad.kind": kind, "mlflow.user": who(),
            "mlflow.source.name": f"dcad {kind}", "mlflow.source.type": "LOCAL",
            **({"mlflow.source.git.commit": commit, "dcad.git_commit": commit} if commit else {}), **options.tags}
    if options.parent_run_id:
        tags["mlflow.parentRunId"] = options.parent_run_id
    return client.create_run(experiment_id, tags=redact_mapping(tags), run_name=options.run_name).info.run_id, experiment_id


def _writer_alive(run) -> bool:
    """Whether the process in the run's writer tags still runs (only knowable on its own host)."""
    import psutil

    tags, pid = run.data.tags, run.data.tags.get("dcad.pid", "")
    return tags.get("dcad.host") == socket.gethostname() and pid.isdigit() and psutil.pid_exists(int(pid))


def end_orphaned_runs(client, experiment_id: str, filter_string: str, why: str) -> list[str]:
    """End as FAILED, tagged `dcad.orphaned` = `why`, the RUNNING runs matching `filter_string` whose writer is gone
    (one written from another host counts as gone)."""
    runs = client.search_runs([experiment_id], filter_string=f"attributes.status = 'RUNNING' and {filter_string}",
                              max_results=1000)
    ended = [run.info.run_id for run in runs if not _writer_alive(run)]
    for run_id in ended:
        client.set_tag(run_id, ORPHANED_TAG, why)
        client.set_terminated(run_id, "FAILED")
    return ended


class RunTracker:
    """One MLflow run whose writes go through a `WriteBuffer`; `lost` says why the run is incomplete in the store."""

    def __init__(self, uri: str, client, run_id: str, experiment_id: str) -> None:
        self.uri, self.client, self.run_id, self.experiment_id = uri, client, run_id, experiment_id
        self.writes = WriteBuffer(redact(uri))
        self.gave_up: str | None = None
        self.model_uri: str | None = None
        self._steps: dict[str, set[int]] | None = None  # metric key -> steps the run has (for log_epoch)

    @property
    def lost(self) -> str | None:
        return self.writes.broken or self.gave_up

    @property
    def link(self) -> str | None:
        return run_link(self.uri, self.experiment_id, self.run_id)

    def _batch(self, what: str, **entities) -> None:
        self.writes.submit(what, lambda: self.client.log_batch(self.run_id, **entities))

    def log_params(self, params: dict[str, Any]) -> None:
        """Params the run does not have yet (read when the write runs: a replay logs only what is missing)."""
        clean = {metric_key(k): _param_value(v) for k, v in redact_mapping(params).items()}

        def write() -> None:
            have = self.client.get_run(self.run_id).data.params
            self.client.log_batch(self.run_id, params=[Param(k, v) for k, v in clean.items() if k not in have])

        self.writes.submit("log params", write)

    def set_tags(self, tags: dict[str, Any]) -> None:
        self._batch("set tags", tags=[RunTag(k, str(v)) for k, v in redact_mapping(tags).items() if v is not None])

    def log_metrics(self, metrics: dict[str, float], step: int = 0) -> None:
        now = int(time.time() * 1000)
        self._batch("log metrics", metrics=[Metric(metric_key(k), float(v), now, step) for k, v in metrics.items()
                                            if _is_number(v)])

    def log_epoch(self, report) -> None:
        """A stage's per-epoch metrics (an `EpochReport`) as `{stage}_{metric}` at step = epoch, each epoch once."""
        self._log_epochs([{"stage": report.stage, "epoch": report.epoch, **report.metrics}], reread=False)

    def log_history(self, history: list[dict]) -> None:
        """Per-epoch metrics from `history.json`, skipping the (key, step) pairs the run already has."""
        self._log_epochs(history, reread=True)

    def _log_epochs(self, history: list[dict], reread: bool) -> None:
        now = int(time.time() * 1000)

        def write() -> None:
            if reread or self._steps is None:
                run = self.client.get_run(self.run_id)
                self._steps = {k: {m.step for m in self.client.get_metric_history(self.run_id, k)} for k in run.data.metrics}
            new: dict[tuple[str, int], Metric] = {}
            for entry in history:
                epoch = int(entry.get("epoch", 0))
                for name, value in entry.items():
                    key = metric_key(f"{entry.get('stage')}_{name}")
                    if name not in ("stage", "epoch") and _is_number(value) and epoch not in self._steps.get(key, ()):
                        new.setdefault((key, epoch), Metric(key, float(value), now, epoch))
            self.client.log_batch(self.run_id, metrics=list(new.values()))
            for key, epoch in new:
                self._steps.setdefault(key, set()).add(epoch)

        self.writes.submit("log metrics", write)

    def log_evaluation(self, result: dict, prefix: str = "test") -> None:
        """`{prefix}_{metric}` (mean over categories) and `{prefix}_{metric}/{category}`."""
        metrics = {f"{prefix}_{k}": v for k, v in result.get("mean", {}).items()}
        for cat, values in result.get("categories", {}).items():
            metrics.update({f"{prefix}_{k}/{cat}": v for k, v in values.items()})
        self.log_metrics(metrics)

    def log_dataset(self, root: str | Path, digest: str, context: str) -> None:
        """The dataset as an MLflow dataset input (source = its path) and its digest as a tag."""
        from mlflow.data.dataset_source_registry import resolve_dataset_source
        from mlflow.data.meta_dataset import MetaDataset
        from mlflow.entities import Dataset, DatasetInput, InputTag

        self.set_tags({"dcad.dataset_digest": digest, "dcad.dataset_root": str(root)})

        def write() -> None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "can be interpreted in multiple ways" (MLflow registers it twice)
                source = resolve_dataset_source(str(root))
            dataset = Dataset(**MetaDataset(source, name=Path(root).name, digest=digest[:32]).to_dict())
            tags = [InputTag("mlflow.data.context", context)]
            self.client.log_inputs(self.run_id, datasets=[DatasetInput(dataset, tags=tags)])

        self.writes.submit("log dataset", write)

    def log_artifacts(self, local: Path, artifact_path: str | None = None) -> None:
        """Upload a file, or the files of a non-empty directory (nothing when missing)."""
        if local.is_file() or (local.is_dir() and any(local.iterdir())):
            what, upload = ("upload artifact", self.client.log_artifact) if local.is_file() else \
                ("upload artifacts", self.client.log_artifacts)
            self.writes.submit(what, lambda p: upload(self.run_id, str(p), artifact_path), source=local)

    log_artifact = log_artifacts

    def log_model(self, model_dir: Path) -> str | None:
        """Log the model directory as the run's pyfunc model; its `models:/<id>` URI (None while the store is away:
        the write is kept and sets `model_uri` when replayed)."""
        self.writes.submit("log model", self._log_model, source=model_dir)
        return self.model_uri

    def _log_model(self, model_dir: Path) -> None:
        """One ready model per run: one this run finished is kept, unfinished ones (interrupted attempts) deleted."""
        from dcad.platform.mlflow_model import log_pyfunc_model

        models = self.client.search_logged_models([self.experiment_id], filter_string=f"source_run_id = '{self.run_id}'")
        for m in models:
            if m.status != LoggedModelStatus.READY:
                self.client.delete_logged_model(m.model_id)
        ready = [m.model_id for m in models if m.status == LoggedModelStatus.READY]
        if ready:
            self.model_uri = f"models:/{ready[0]}"
        else:
            active = mlflow.active_run()
            own = active is not None and active.info.run_id == self.run_id
            with use_store(self.uri), (nullcontext() if own else
                                       mlflow.start_run(run_id=self.run_id, nested=active is not None, log_system_metrics=False)):
                self.model_uri = log_pyfunc_model(model_dir).model_uri
            if not own:
                self.client.update_run(self.run_id, status="RUNNING")  # leaving start_run ended it; finish() does
        self.client.set_tag(self.run_id, "dcad.model_uri", self.model_uri)

    def finish(self, status: str = "FINISHED", wait_s: float | None = None) -> None:
        """End the run once every kept write reached the store, waiting up to `wait_s` (default `store_wait_s()`)
        for a store that went away; then `lost` says if it did not come back."""
        self.writes.submit("end run", lambda: self.client.set_terminated(self.run_id, status))
        if not self.writes.drain(store_wait_s() if wait_s is None else wait_s) and self.writes.broken is None:
            self.gave_up = f"{self.writes.pending} write(s) kept since {self.writes.reason}"

    def lost_error(self, model_dir: Path | None) -> TrackingLostError:
        where = f"the model directory {model_dir} is complete" if model_dir else "the results are on disk"
        retry = f"dcad log {model_dir} --tracking-uri {self.uri} --run-id {self.run_id}" if model_dir else ""
        return TrackingLostError(f"tracking to {self.uri} failed during the run ({self.lost}); {where}; "
                                 f"log it when the store is back: {retry}")


def _param_value(value: Any) -> str:
    text = str(value)  # redact_mapping already turned anything but numbers and None into str
    return text if len(text) <= PARAM_VALUE_LIMIT else text[: PARAM_VALUE_LIMIT - 3] + "..."


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and not (isinstance(value, float) and math.isinf(value))


def log_model_outputs(tracker: RunTracker, model_dir: Path) -> None:
    """What a finished model directory holds: final metrics, config, report files and the model."""
    metrics_file = model_dir / "metrics.json"
    if metrics_file.is_file():
        result = json.loads(metrics_file.read_text())
        tracker.log_evaluation(result, "test")
        tracker.log_metrics(result.get("validation") or {})
        tracker.log_metrics({f"time_{k}": v for k, v in (result.get("timing") or {}).items()})
    tracker.log_artifacts(model_dir / CONFIG_FILE)
    tracker.log_artifacts(model_dir / REPORT_DIR, REPORT_DIR)
    tracker.log_model(model_dir)


def log_model_dir(tracker: RunTracker, model_dir: Path, data_root: Path | None = None) -> None:
    """Everything about a model directory, for `dcad log` (idempotent on a partly logged run)."""
    from dcad.core.config import DCADConfig

    meta = read_metadata(model_dir)
    cfg = DCADConfig.from_yaml(model_dir / CONFIG_FILE)
    tracker.log_params(cfg.flat())
    tracker.set_tags({"dcad.profile": cfg.profile, "dcad.model_dir": str(model_dir.resolve())})
    root = data_root or meta.get("dataset_root")
    if meta.get("dataset_digest") and root:
        tracker.log_dataset(root, meta["dataset_digest"], "train")
    elif meta.get("dataset_digest"):
        tracker.set_tags({"dcad.dataset_digest": meta["dataset_digest"]})
    history_file = model_dir / "history.json"
    if history_file.is_file():
        tracker.log_history(json.loads(history_file.read_text()).get("epochs", []))
    log_model_outputs(tracker, model_dir)
