"""MLflow run tracking for `dcad train`, `dcad eval --log` and `dcad log`.

A `RunTracker` owns one MLflow run. `start_run` checks the store first (a dead server fails
before any training). After that, training never waits for the store: if the server goes away, writes
are kept in order and replayed when it is back (`tracking_buffer.WriteBuffer`), and `finish` waits for
them (`DCAD_TRACKING_WAIT_S`). If the store does not come back, or refuses a write, the caller finishes
its work locally and raises `TrackingLostError` with the `dcad log` command that uploads what is
missing (see `log_model_dir`, which skips what the run already has).

Names logged (per-category keys sanitised):
    params        the flattened config (`base.hidden_dim`, ...)
    metrics       `{stage}_{metric}` per epoch (step = epoch), `val_*` (final validation),
                  `test_{metric}` (mean over categories), `test_{metric}/{category}`
    tags          dcad.version, dcad.kind, dcad.profile, dcad.dataset_digest, dcad.model_dir,
                  dcad.host and dcad.pid (the process that writes the run: `end_orphaned_runs` reads them),
                  mlflow.source.git.commit (when the code is a git checkout)
    inputs        the dataset (MLflow dataset input, context train / evaluation)
    artifacts     config.yaml, report/ (metrics table, ROC/PRO plots, heatmaps), model (pyfunc)
"""

from __future__ import annotations

import getpass
import json
import math
import os
import re
import socket
import subprocess
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from dcad import __version__
from dcad.core.model.model_dir import CONFIG_FILE, read_metadata
from dcad.platform.errors import TrackingError, TrackingLostError, describe
from dcad.platform.secrets import redact, redact_mapping
from dcad.platform.store import DEFAULT_EXPERIMENT, get_or_create_experiment, open_store, run_link, use_store

REPORT_DIR = "report"
PARAM_VALUE_LIMIT = 6000
BATCH_LIMIT = 100  # params or metrics per log_batch call (MLflow's limit is 1000 entries in total)
_KEY_UNSAFE = re.compile(r"[^A-Za-z0-9_\-. /]")


@dataclass
class TrackingOptions:
    """What the CLI options select: where, which experiment, which run name; `enabled=False` = --no-track."""

    tracking_uri: str | None = None
    experiment: str = DEFAULT_EXPERIMENT
    run_name: str | None = None
    parent_run_id: str | None = None
    enabled: bool = True
    tags: dict[str, str] = field(default_factory=dict)


def metric_key(name: str) -> str:
    """MLflow-safe metric/param key (alphanumerics, `_ - . / space`)."""
    return _KEY_UNSAFE.sub("_", name)


def git_commit() -> str | None:
    """The commit of the dcad source checkout, or None (installed package, no git, no commit yet)."""
    source = Path(__file__).resolve().parents[2]
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=source, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    sha = out.stdout.strip()
    return sha if out.returncode == 0 and re.fullmatch(r"[0-9a-f]{40}", sha) else None


def writer_tags() -> dict[str, str]:
    """Which process writes a run: a run still RUNNING whose writer is gone was orphaned (SIGKILL, OOM)."""
    return {"dcad.host": socket.gethostname(), "dcad.pid": str(os.getpid())}


def base_tags(kind: str) -> dict[str, str]:
    tags = {
        **writer_tags(),
        "dcad.version": __version__,
        "dcad.kind": kind,
        "mlflow.user": getpass.getuser(),
        "mlflow.source.name": f"dcad {kind}",
        "mlflow.source.type": "LOCAL",
    }
    commit = git_commit()
    if commit:
        tags["mlflow.source.git.commit"] = commit
        tags["dcad.git_commit"] = commit
    return tags


SQLITE_ATTEMPTS = 3  # concurrent processes on one sqlite store can meet a lock or a migration race


def start_run(options: TrackingOptions, kind: str, run_id: str | None = None) -> "RunTracker":
    """Check the store (TrackingError if unusable), then create a run (or reopen `run_id`)."""
    uri, client = open_store(options.tracking_uri)
    attempts = SQLITE_ATTEMPTS if uri.startswith("sqlite:") else 1
    for attempt in range(1, attempts + 1):
        try:
            return _open_run(uri, client, options, kind, run_id)
        except TrackingError:
            raise
        except Exception as err:  # MlflowException, requests errors, sqlite errors
            if attempt < attempts and _transient(err):
                time.sleep(attempt)
                continue
            raise TrackingError(f"tracking store {uri}: cannot start a run ({_first_line(err)})") from None
    raise AssertionError("unreachable")


def _transient(err: Exception) -> bool:
    text = str(err).lower()
    return any(word in text for word in ("database is locked", "already exists", "operationalerror"))


def _open_run(uri: str, client, options: TrackingOptions, kind: str, run_id: str | None) -> "RunTracker":
    if run_id is not None:
        run = client.get_run(run_id)
        if run.info.status != "RUNNING":
            client.update_run(run_id, status="RUNNING")
        for key, value in writer_tags().items():
            client.set_tag(run_id, key, value)
        if ORPHANED_TAG in run.data.tags:  # ended by a resume that found it orphaned; continued now
            client.delete_tag(run_id, ORPHANED_TAG)
        return RunTracker(uri, client, run_id, run.info.experiment_id)
    experiment_id = get_or_create_experiment(client, options.experiment, uri)
    tags = {**base_tags(kind), **options.tags}
    if options.parent_run_id:
        tags["mlflow.parentRunId"] = options.parent_run_id
    run = client.create_run(experiment_id, tags=redact_mapping(tags), run_name=options.run_name)
    return RunTracker(uri, client, run.info.run_id, experiment_id)


ORPHANED_TAG = "dcad.orphaned"


def writer_alive(run) -> bool:
    """Whether the process recorded in the run's writer tags still runs (only knowable on its own host)."""
    tags = run.data.tags
    if tags.get("dcad.host") != socket.gethostname() or not tags.get("dcad.pid", "").isdigit():
        return False
    from dcad.platform.stack.procs import pid_alive

    pid = int(tags["dcad.pid"])
    return pid == os.getpid() or pid_alive(pid)


def end_orphaned_runs(client, experiment_id: str, filter_string: str, why: str) -> list[str]:
    """End as FAILED the RUNNING runs matching `filter_string` whose writer process is gone.

    Called when a command takes over what those runs were doing (`--resume`): a process killed by SIGKILL
    or the OOM killer never ends its run, and a run left RUNNING would look alive forever. A run whose
    writer still runs on this host is left alone; one written from another host is ended (the resume is
    the new writer). Tagged `dcad.orphaned` with `why`. Returns the ended run ids."""
    runs = client.search_runs([experiment_id], filter_string=f"attributes.status = 'RUNNING' and {filter_string}",
                              max_results=1000)
    ended = []
    for run in runs:
        if writer_alive(run):
            continue
        client.set_tag(run.info.run_id, ORPHANED_TAG, why)
        client.set_terminated(run.info.run_id, "FAILED")
        ended.append(run.info.run_id)
    return ended


def _first_line(err: BaseException) -> str:
    return describe(err)


class RunTracker:
    """One MLflow run. Writes go through a `WriteBuffer`: replayed if the store goes away for a while;
    `lost` says why tracking ended (the store refused a write, or did not come back before `finish`)."""

    def __init__(self, uri: str, client, run_id: str, experiment_id: str) -> None:
        from dcad.platform.tracking_buffer import WriteBuffer

        self.uri, self.client, self.run_id, self.experiment_id = uri, client, run_id, experiment_id
        self.writes = WriteBuffer(redact(uri))
        self.gave_up: str | None = None  # set by `finish` when kept writes never reached the store
        self.model_uri: str | None = None
        self._epoch_steps: dict[str, set[int]] | None = None  # (metric, step) pairs the run has, for log_epoch

    @property
    def lost(self) -> str | None:
        """Why the run is incomplete in the store, or None."""
        return self.writes.broken or self.gave_up

    # ---- plumbing -------------------------------------------------------------------------------
    def _write(self, what: str, fn: Callable[..., Any], *args, **kwargs) -> Any:
        return self.writes.submit(what, lambda: fn(*args, **kwargs))

    def _read(self, what: str, fn: Callable[..., Any], *args, **kwargs) -> Any:
        """A read for the caller's decision; None while writes are kept (the store is away) or on failure."""
        if self.writes.pending or self.lost is not None:
            return None
        try:
            return fn(*args, **kwargs)
        except Exception:  # noqa: BLE001 - a failed read only skips an optimisation; writes tell the state
            return None

    @property
    def link(self) -> str | None:
        return run_link(self.uri, self.experiment_id, self.run_id)

    # ---- what is logged -------------------------------------------------------------------------
    def log_params(self, params: dict[str, Any]) -> None:
        """Params the run does not have yet (read when the write runs: a replay logs only what is missing)."""
        clean = redact_mapping(params)
        self.writes.submit("log params", lambda: self._log_new_params(clean))

    def _log_new_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        existing = self.client.get_run(self.run_id).data.params
        items = [Param(metric_key(k), _param_value(v)) for k, v in params.items() if metric_key(k) not in existing]
        for chunk in _chunks(items, BATCH_LIMIT):
            self.client.log_batch(self.run_id, params=chunk)

    def set_tags(self, tags: dict[str, Any]) -> None:
        from mlflow.entities import RunTag

        items = [RunTag(k, str(v)) for k, v in redact_mapping(tags).items() if v is not None]
        for chunk in _chunks(items, BATCH_LIMIT):
            self._write("set tags", self.client.log_batch, self.run_id, tags=chunk)

    def log_metrics(self, metrics: dict[str, float], step: int = 0) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(metric_key(k), float(v), now, step) for k, v in metrics.items() if _is_number(v)]
        for chunk in _chunks(items, BATCH_LIMIT):
            self._write("log metrics", self.client.log_batch, self.run_id, metrics=chunk)

    def log_epoch(self, report) -> None:
        """Per-epoch training and validation metrics of a stage (an `EpochReport`). An epoch that runs again
        (workers restarted from an earlier checkpoint after a node was lost) is not logged a second time."""
        if self._epoch_steps is None:
            try:
                self._epoch_steps = self._logged_steps()
            except Exception:  # the store is away: log everything (its writes are kept and replayed)
                self._epoch_steps = {}
        self.log_metrics(_unlogged(report.stage, report.epoch, report.metrics, self._epoch_steps), step=report.epoch)

    def log_history(self, history: list[dict]) -> None:
        """Per-epoch metrics from `history.json`, skipping (key, step) pairs the run already has (read when
        the write runs)."""
        self.writes.submit("log history", lambda: self._log_new_history(history))

    def _log_new_history(self, history: list[dict]) -> None:
        from mlflow.entities import Metric

        have = self._logged_steps()
        now = int(time.time() * 1000)
        items = []
        for entry in history:
            stage, epoch = entry.get("stage"), int(entry.get("epoch", 0))
            metrics = {k: v for k, v in entry.items() if k not in ("stage", "epoch")}
            items += [Metric(key, value, now, epoch) for key, value in _unlogged(stage, epoch, metrics, have).items()]
        for chunk in _chunks(items, BATCH_LIMIT):
            self.client.log_batch(self.run_id, metrics=chunk)

    def _logged_steps(self) -> dict[str, set[int]]:
        run = self.client.get_run(self.run_id)
        return {key: {m.step for m in self.client.get_metric_history(self.run_id, key)} for key in run.data.metrics}

    def log_evaluation(self, result: dict, prefix: str = "test") -> None:
        """`{prefix}_{metric}` (mean over categories) and `{prefix}_{metric}/{category}`."""
        metrics = {f"{prefix}_{k}": v for k, v in result.get("mean", {}).items()}
        for cat, values in result.get("categories", {}).items():
            metrics.update({f"{prefix}_{k}/{cat}": v for k, v in values.items()})
        self.log_metrics(metrics)

    def log_dataset(self, root: str | Path, digest: str, context: str, name: str | None = None) -> None:
        """The dataset as an MLflow dataset input (source = its path) and its digest as a tag."""
        self.set_tags({"dcad.dataset_digest": digest, "dcad.dataset_root": str(root)})
        self._write("log dataset", self._log_dataset, str(root), digest, context, name)

    def _log_dataset(self, root: str, digest: str, context: str, name: str | None) -> None:
        from mlflow.data.dataset_source_registry import resolve_dataset_source
        from mlflow.data.meta_dataset import MetaDataset
        from mlflow.entities import DatasetInput, InputTag

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "can be interpreted in multiple ways" (MLflow registers it twice)
            source = resolve_dataset_source(root)
        dataset = MetaDataset(source, name=name or Path(root).name, digest=digest[:32])
        tags = [InputTag("mlflow.data.context", context)]
        self.client.log_inputs(self.run_id, datasets=[DatasetInput(dataset._to_mlflow_entity(), tags=tags)])

    def log_artifacts(self, local_dir: Path, artifact_path: str | None = None) -> None:
        if local_dir.is_dir() and any(local_dir.iterdir()):
            upload = lambda d: self.client.log_artifacts(self.run_id, str(d), artifact_path)  # noqa: E731
            self.writes.submit("upload artifacts", upload, source=local_dir)

    def log_artifact(self, local_file: Path, artifact_path: str | None = None) -> None:
        if local_file.is_file():
            upload = lambda f: self.client.log_artifact(self.run_id, str(f), artifact_path)  # noqa: E731
            self.writes.submit("upload artifact", upload, source=local_file)

    def log_model(self, model_dir: Path) -> str | None:
        """Log the model directory as the run's pyfunc model; returns its `models:/<id>` URI (None while the
        store is away: the write is kept, and sets `model_uri` when it is replayed)."""
        self.writes.submit("log model", self._log_model_once, source=model_dir)
        return self.model_uri

    def _log_model_once(self, model_dir: Path) -> None:
        """One ready model per run: a model this run already finished is kept, one an interrupted attempt left
        unfinished is deleted before logging again."""
        from mlflow.entities import LoggedModelStatus

        models = self.client.search_logged_models([self.experiment_id], filter_string=f"source_run_id = '{self.run_id}'")
        ready = [m for m in models if m.status == LoggedModelStatus.READY]
        for m in models:
            if m.status != LoggedModelStatus.READY:
                self.client.delete_logged_model(m.model_id)
        uri = f"models:/{ready[0].model_id}" if ready else self._log_model(model_dir).model_uri
        self.model_uri = uri
        self.client.set_tag(self.run_id, "dcad.model_uri", uri)

    def _log_model(self, model_dir: Path):
        import mlflow

        from dcad.platform.model_package import log_pyfunc_model

        active = mlflow.active_run()
        if active is not None and active.info.run_id == self.run_id:
            with use_store(self.uri):
                return log_pyfunc_model(model_dir)
        with use_store(self.uri), mlflow.start_run(run_id=self.run_id, nested=active is not None, log_system_metrics=False):
            info = log_pyfunc_model(model_dir)
        self.client.update_run(self.run_id, status="RUNNING")  # leaving start_run ended it; finish() does
        return info

    def logged_model_ids(self) -> list[str]:
        run = self._read("read run", self.client.get_run, self.run_id)
        return [o.model_id for o in run.outputs.model_outputs] if run and run.outputs else []

    def finish(self, status: str = "FINISHED", wait_s: float | None = None) -> None:
        """End the run once every kept write reached the store, waiting up to `wait_s` (default
        `DCAD_TRACKING_WAIT_S`, 300 s) for a store that went away; then `lost` says if it did not come back."""
        self._write("end run", self.client.set_terminated, self.run_id, status)
        from dcad.platform.tracking_buffer import store_wait_s

        wait_s = store_wait_s() if wait_s is None else wait_s
        if not self.writes.drain(wait_s) and self.writes.broken is None:
            self.gave_up = f"{self.writes.pending} write(s) kept since {self.writes.reason}"

    def lost_error(self, model_dir: Path | None, command: str | None = None) -> TrackingLostError:
        where = f"the model directory {model_dir} is complete" if model_dir else "the results are on disk"
        retry = command or (f"dcad log {model_dir} --tracking-uri {self.uri} --run-id {self.run_id}" if model_dir else "")
        return TrackingLostError(
            f"tracking to {self.uri} failed during the run ({self.lost}); {where}; "
            f"log it when the store is back: {retry}"
        )


def _chunks(items: list, size: int) -> list[list]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def _param_value(value: Any) -> str:
    text = json.dumps(value) if isinstance(value, (list, dict)) else str(value)
    return text if len(text) <= PARAM_VALUE_LIMIT else text[: PARAM_VALUE_LIMIT - 3] + "..."


def _unlogged(stage: str, epoch: int, metrics: dict[str, Any], have: dict[str, set[int]]) -> dict[str, float]:
    """`{stage}_{name}` → value of the numeric metrics whose step `epoch` is not in `have` (metric key → steps
    the run has), which records them: an epoch reported again is logged once."""
    out = {}
    for name, value in metrics.items():
        key = metric_key(f"{stage}_{name}")
        if _is_number(value) and epoch not in have.setdefault(key, set()):
            have[key].add(epoch)
            out[key] = float(value)
    return out


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and not (isinstance(value, float) and math.isinf(value))


# ---- a model directory's outputs ----------------------------------------------------------------
def log_model_outputs(tracker: RunTracker, model_dir: Path) -> None:
    """What a finished model directory holds: final metrics, config, report files and the model."""
    metrics_file = model_dir / "metrics.json"
    if metrics_file.is_file():
        result = json.loads(metrics_file.read_text())
        tracker.log_evaluation(result, "test")
        tracker.log_metrics({k: v for k, v in (result.get("validation") or {}).items()})
        tracker.log_metrics({f"time_{k}": v for k, v in (result.get("timing") or {}).items()})
    tracker.log_artifact(model_dir / CONFIG_FILE)
    tracker.log_artifacts(model_dir / REPORT_DIR, REPORT_DIR)
    if not tracker.logged_model_ids():
        tracker.log_model(model_dir)


def log_model_dir(tracker: RunTracker, model_dir: Path, data_root: Path | None = None) -> None:
    """Everything about a model directory, for `dcad log` (idempotent on a partly logged run)."""
    from dcad.core.config import DCADConfig

    meta = read_metadata(model_dir)
    cfg = DCADConfig.from_yaml(model_dir / CONFIG_FILE)
    tracker.log_params(cfg.flat())
    tracker.set_tags({"dcad.profile": cfg.profile, "dcad.model_dir": str(model_dir.resolve())})
    root = data_root or meta.get("dataset_root")
    if meta.get("dataset_digest"):
        if root:
            tracker.log_dataset(root, meta["dataset_digest"], "train")
        else:
            tracker.set_tags({"dcad.dataset_digest": meta["dataset_digest"]})
    history_file = model_dir / "history.json"
    if history_file.is_file():
        tracker.log_history(json.loads(history_file.read_text()).get("epochs", []))
    log_model_outputs(tracker, model_dir)
