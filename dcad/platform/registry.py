"""The model registry: gated promotion of a run's model to an alias, rollback, a per-model write lock, and the
views `dcad models` prints (rules: docs/cluster.md §3)."""

from __future__ import annotations

import json
import os
import re
import socket
import time
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterator

from mlflow.exceptions import MlflowException

from dcad.core.clock import now_utc
from dcad.core.metrics import METRIC_KEYS
from dcad.platform.errors import RegistryError
from dcad.platform.gate import DEFAULT_FLOOR, DEFAULT_GATE_METRICS, DEFAULT_TOLERANCE, GateResult, check_gate
from dcad.platform.mlflow_store import use_store, who

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,254}$")
ALIAS_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]{0,254}$")
RESERVED_ALIAS = re.compile(r"^(latest|v\d+)$", re.IGNORECASE)
EVENT_LOG_LIMIT = 200
LOCK_SUFFIX, LOCK_TAG, LOCK_OWNER = ".dcad-lock", "dcad.lock_of", "dcad.lock.owner"
LOCK_STALE_S, LOCK_WAIT_S = 600.0, 300.0

Evaluate = Callable[[str, Path], dict]  # (model URI, data root) -> {"categories": ..., "mean": ...}


@dataclass
class PromotionRequest:
    name: str
    run_id: str
    alias: str = "champion"
    data: Path | None = None
    tolerance: float = DEFAULT_TOLERANCE
    gate_metrics: tuple[str, ...] = DEFAULT_GATE_METRICS
    force: bool = False
    reuse_recorded: bool = True  # take the holder's metrics from its tags when measured on the same data
    floor: float = DEFAULT_FLOOR  # least mean of every gate metric the candidate needs (0: none)


@dataclass
class PromotionResult:
    name: str
    alias: str
    version: str
    previous: str | None
    gate: GateResult
    forced: bool  # the alias moved although the gate refused
    data: Path
    notes: list[str] = field(default_factory=list)
    candidate: dict = field(default_factory=dict)

    @property
    def moved(self) -> bool:
        return self.gate.passed or self.forced

    @property
    def decision(self) -> str:
        if self.gate.passed:
            return "passed" if self.gate.has_incumbent else "first"
        return "forced" if self.forced else "refused"

    def refusal(self) -> str:
        """Why the gate refused: the floor, the regressions against the holder, or both."""
        reasons = [self.gate.floor_text()] if self.gate.below_floor else []
        if self.gate.regressions:
            reasons.append(f"{len(self.gate.regressions)} regression(s) beyond {self.gate.tolerance:g} against "
                           f"{self.name}@{self.alias} version {self.previous}")
        return "; ".join(reasons)


# ---- lookups and validation ----------------------------------------------------------------------
def validate_name(client, name: str) -> bool:
    """True if the registered model exists; RegistryError for a name dcad would not create."""
    if name.endswith(LOCK_SUFFIX):
        raise RegistryError(f"invalid model name '{name}': names ending in '{LOCK_SUFFIX}' are dcad's write locks")
    if registered_model(client, name) is not None:
        return True
    if not name or not NAME_RE.match(name):
        raise RegistryError(f"invalid model name '{name}': use letters, digits, '_', '-' and '.', starting with a "
                            "letter or digit")
    return False


def validate_alias(alias: str) -> None:
    if not alias or not ALIAS_RE.match(alias) or RESERVED_ALIAS.match(alias):
        raise RegistryError(f"invalid alias '{alias}': use letters, digits, '_' and '-' (e.g. champion, "
                            "challenger); 'latest' and v<N> are reserved")


def _unless_missing(fetch, *args):
    """`fetch(*args)`, or None when the store says the model, version or alias does not exist."""
    try:
        return fetch(*args)
    except MlflowException as err:
        if err.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            return None
        raise


def registered_model(client, name: str):
    return _unless_missing(client.get_registered_model, name) if name else None


def _existing_model(client, name: str):
    model = registered_model(client, name)
    if model is None:
        raise RegistryError(f"registered model '{name}' not found")
    return model


def alias_holder(client, name: str, alias: str):
    """The model version holding `alias`, or None (no such model or alias)."""
    return _unless_missing(client.get_model_version_by_alias, name, alias)


def _versions(client, name: str) -> list:
    return client.search_model_versions(f"name='{name}'")


def _aliases(model) -> dict[str, str]:
    return {alias: str(version) for alias, version in (model.aliases or {}).items()}


def source_run(client, run_id: str):
    """The run with this id, else the one run with this name, or the run behind `models:/NAME@ALIAS|VERSION`."""
    if run_id.startswith("models:/"):
        ref = run_id[len("models:/"):]
        name, _, number = ref.rpartition("/")
        try:
            version = alias_holder(client, *ref.split("@", 1)) if "@" in ref else client.get_model_version(name, number)
        except MlflowException:
            version = None
        if version is None:
            raise RegistryError(f"--run {run_id}: no such registered model version")
        if not version.run_id:
            raise RegistryError(f"--run {run_id}: the version records no source run")
        return client.get_run(version.run_id)
    if not run_id or not re.fullmatch(r"[0-9a-zA-Z_.-]{1,64}", run_id):
        raise RegistryError(f"invalid run id '{run_id}'")
    try:
        return client.get_run(run_id)
    except MlflowException:
        pass
    ids = [e.experiment_id for e in client.search_experiments()]
    named = client.search_runs(ids, filter_string=f"attributes.run_name = '{run_id}'", max_results=3) if ids else []
    if len(named) == 1:
        return named[0]
    if named:
        raise RegistryError(f"run name '{run_id}' is ambiguous ({len(named)}+ runs); pass the run id")
    raise RegistryError(f"run '{run_id}' not found in the tracking store (neither a run id nor a run name)")


def run_model_id(run) -> str:
    outputs = run.outputs.model_outputs if run.outputs else []
    if not outputs:
        raise RegistryError(f"run {run.info.run_id} has no logged model (log the model directory with: "
                            f"dcad log MODEL_DIR --run-id {run.info.run_id})")
    return outputs[-1].model_id


def evaluation_data(run, data: Path | None) -> Path:
    """`data`, else the dataset the run recorded (`RunTracker.log_dataset` tags its root)."""
    root = data or (Path(run.data.tags["dcad.dataset_root"]) if run.data.tags.get("dcad.dataset_root") else None)
    if root is None:
        raise RegistryError(f"run {run.info.run_id} has no recorded dataset; pass the evaluation data with --data")
    if not root.is_dir():
        raise RegistryError(f"evaluation data {root}: no such directory (pass --data)")
    return root


def version_model_id(version) -> str | None:
    """The logged model behind a version (database stores leave `model_id` empty; the source names it)."""
    source = version.source or ""
    return getattr(version, "model_id", None) or (source[len("models:/"):] if source.startswith("models:/m-") else None)


def version_for(client, name: str, run, model_id: str, tags: dict[str, str] | None = None):
    """This logged model's version; else a new one tagged with its registration and `tags` (model created if new)."""
    if registered_model(client, name) is None:
        client.create_registered_model(name, tags={"dcad.created_by": who()})
    for mv in _versions(client, name):
        if version_model_id(mv) == model_id:
            return mv
    tags = {"dcad.registered_by": who(), "dcad.registered_at": now_utc(), "dcad.source_run": run.info.run_id,
            **(tags or {})}
    with use_store(client.tracking_uri):  # the registry resolves models:/ sources through the global tracking URI
        return client.create_model_version(name, source=f"models:/{model_id}", run_id=run.info.run_id,
                                           model_id=model_id, tags=tags)


def dataset_digest(data: Path) -> str:
    from dcad.core.data import open_dataset

    return open_dataset(data).digest()


def recorded_metrics(version, digest: str) -> dict | None:
    """A version's evaluation as recorded at its promotion, if it was made on data with this digest."""
    tags = version.tags or {}
    if tags.get("dcad.eval_dataset_digest") != digest:
        return None
    try:
        categories = json.loads(tags["dcad.metrics.per_category"])
    except (KeyError, ValueError):
        return None
    return {"categories": categories, "mean": _tagged_metrics(tags)}


def _tagged_metrics(tags: dict) -> dict[str, float]:
    return {k: float(tags[f"dcad.metric.{k}"]) for k in METRIC_KEYS if f"dcad.metric.{k}" in tags}


# ---- promotion -------------------------------------------------------------------------------------
def promote(client, request: PromotionRequest, evaluate: Evaluate, log=None) -> PromotionResult:
    """Check every input and evaluate the candidate, then, under the model's write lock, gate it against the alias
    holder, register and tag it, and move the alias if allowed (`log` hears when another writer holds the lock)."""
    validate_name(client, request.name)
    validate_alias(request.alias)
    run = source_run(client, request.run_id)
    model_id = run_model_id(run)
    data = evaluation_data(run, request.data)
    digest = dataset_digest(data)
    candidate = evaluate(f"models:/{model_id}", data)
    with model_lock(client, request.name, log=log):
        holder = alias_holder(client, request.name, request.alias)
        incumbent = None
        if holder is not None:
            incumbent = recorded_metrics(holder, digest) if request.reuse_recorded else None
            incumbent = incumbent or evaluate(f"models:/{request.name}/{holder.version}", data)
        gate = check_gate(candidate, incumbent, tuple(request.gate_metrics), request.tolerance, request.floor)
        version = str(version_for(client, request.name, run, model_id).version)
        result = PromotionResult(request.name, request.alias, version, str(holder.version) if holder else None, gate,
                                 request.force and not gate.passed, data, candidate=candidate)
        if result.previous == version:
            result.notes.append(f"version {version} already holds '{request.alias}'")
        if run.data.tags.get("dcad.dataset_digest") not in (None, digest):
            result.notes.append(f"evaluated on {data}, which differs from the run's training dataset")
        _tag_version(client, run, result, digest)
        if result.moved:
            client.set_registered_model_alias(request.name, request.alias, version)
        _record(client, request.name, request.alias, result.decision, version, result.previous, push=result.moved)
    return result


def _tag_version(client, run, result: PromotionResult, digest: str) -> None:
    tags, gate, metrics, prefix = run.data.tags, result.gate, result.candidate, f"dcad.gate.{result.alias}"
    values = {
        "dcad.source_run": run.info.run_id,
        "dcad.source_experiment": run.info.experiment_id,
        "dcad.sweep": tags.get("dcad.sweep") or tags.get("mlflow.parentRunId"),
        "dcad.dataset_digest": tags.get("dcad.dataset_digest"),
        "dcad.eval_data": str(result.data),
        "dcad.eval_dataset_digest": digest,
        "dcad.metrics.per_category": json.dumps(metrics.get("categories", {}), allow_nan=True),
        **{f"dcad.metric.{k}": f"{metrics['mean'][k]:.6f}" for k in METRIC_KEYS if k in metrics.get("mean", {})},
        f"{prefix}.result": result.decision,
        f"{prefix}.against": result.previous or "",
        f"{prefix}.metrics": ",".join(gate.metrics),
        f"{prefix}.tolerance": f"{gate.tolerance:g}",
        f"{prefix}.floor": f"{gate.floor:g}",
        f"{prefix}.below_floor": json.dumps(gate.below_floor, allow_nan=True),
        f"{prefix}.regressions": json.dumps([r.to_dict() for r in gate.regressions], allow_nan=True),
        f"{prefix}.forced": "true" if result.forced else "false",
        f"{prefix}.by": who(),
        f"{prefix}.at": now_utc(),
    }
    for key, value in values.items():
        if value is not None:
            client.set_model_version_tag(result.name, result.version, key, str(value))


# ---- alias history and rollback ----------------------------------------------------------------------
def alias_history(model, alias: str) -> list[str]:
    """The versions that held `alias`, oldest first."""
    return [str(v) for v in _alias_tag(model, alias, "history")]


def alias_log(model, alias: str) -> list[dict]:
    """Every promotion, refusal and rollback of `alias`, oldest first (the last EVENT_LOG_LIMIT)."""
    return list(_alias_tag(model, alias, "log"))


def _alias_tag(model, alias: str, kind: str) -> list:
    try:
        return json.loads(model.tags.get(f"dcad.alias.{alias}.{kind}", "[]"))
    except ValueError:
        return []


def _record(client, name: str, alias: str, event: str, version: str, previous: str | None, push: bool,
            history: list[str] | None = None) -> None:
    model = client.get_registered_model(name)
    history = alias_history(model, alias) if history is None else history
    if push:
        if previous and (not history or history[-1] != previous):
            history.append(previous)  # the alias was moved outside dcad: keep its holder in the history
        if not history or history[-1] != version:
            history.append(version)
    log = [*alias_log(model, alias), {"event": event, "version": version, "from": previous, "by": who(), "at": now_utc()}]
    client.set_registered_model_tag(name, f"dcad.alias.{alias}.history", json.dumps(history))
    client.set_registered_model_tag(name, f"dcad.alias.{alias}.log", json.dumps(log[-EVENT_LOG_LIMIT:]))


def rollback(client, name: str, alias: str) -> tuple[str, str]:
    """Move `alias` back to its previous holder; returns (from_version, to_version)."""
    validate_alias(alias)
    _existing_model(client, name)
    with model_lock(client, name):
        model = client.get_registered_model(name)
        current = _aliases(model).get(alias)
        if current is None:
            raise RegistryError(f"model '{name}' has no alias '{alias}' to roll back")
        history = alias_history(model, alias)
        while history and history[-1] == current:
            history.pop()
        if not history:
            raise RegistryError(f"alias '{alias}' of '{name}' has no previous holder (version {current} is the first)")
        client.set_registered_model_alias(name, alias, history[-1])
        _record(client, name, alias, "rollback", history[-1], current, push=False, history=history)
        client.set_model_version_tag(name, current, f"dcad.gate.{alias}.rolled_back", f"{who()} {now_utc()}")
    return current, history[-1]


# ---- the write lock: one writer per registered model -------------------------------------------------
def lock_name(name: str) -> str:
    return f"{name}{LOCK_SUFFIX}"


@contextmanager
def model_lock(client, name: str, log=None) -> Iterator[None]:
    """Hold the write lock of `name` (the registered model NAME.dcad-lock, created only once) inside the block;
    a lock older than LOCK_STALE_S is broken, RegistryError after LOCK_WAIT_S."""
    lock, deadline, told = lock_name(name), time.monotonic() + LOCK_WAIT_S, False
    while not _create_lock(client, lock, name):
        held = _unless_missing(client.get_registered_model, lock)  # None: released meanwhile
        since = (held.creation_timestamp or 0) / 1000 if held is not None else time.time()
        if time.time() - since > LOCK_STALE_S:
            _delete_lock(client, lock)  # its holder died with it
            continue
        if time.monotonic() >= deadline:
            by = "another writer"
            if held is not None:
                by = f"{held.tags.get(LOCK_OWNER, '?')} since {time.strftime('%H:%M:%S', time.localtime(since))}"
            raise RegistryError(f"registered model '{name}' is being changed by {by}; try again, or delete the "
                                f"registered model '{lock}' if that process is gone")
        if log is not None and not told:
            log(f"registered model '{name}' is being changed by another process: waiting for it")
            told = True
        time.sleep(0.2)
    try:
        yield
    finally:
        _delete_lock(client, lock)


def _create_lock(client, lock: str, name: str) -> bool:
    tags = {LOCK_TAG: name, LOCK_OWNER: f"{socket.gethostname()}:{os.getpid()}"}
    try:
        client.create_registered_model(lock, tags=tags, description=f"dcad write lock of '{name}' (deleted when done)")
        return True
    except MlflowException as err:
        if "already exists" in str(err).lower() or err.error_code == "RESOURCE_ALREADY_EXISTS":
            return False
        raise


def _delete_lock(client, lock: str) -> None:
    with suppress(MlflowException):  # already gone (broken as stale by another writer)
        client.delete_registered_model(lock)


# ---- views for `dcad models list|show` -------------------------------------------------------------
def list_models(client) -> list[dict]:
    rows = []
    for model in client.search_registered_models():
        if model.name.endswith(LOCK_SUFFIX):  # validate_name keeps the suffix for locks
            continue
        full = client.get_registered_model(model.name)  # search results lack aliases on database stores
        versions = _versions(client, model.name)
        rows.append({"name": full.name, "versions": len(versions),
                     "latest": max((int(v.version) for v in versions), default=None),
                     "aliases": _aliases(full), "updated": _iso(full.last_updated_timestamp)})
    return sorted(rows, key=lambda r: r["name"])


def show_model(client, name: str) -> dict:
    model = _existing_model(client, name)
    aliases = _aliases(model)
    versions = [
        {"version": str(mv.version), "aliases": sorted(a for a, v in aliases.items() if v == str(mv.version)),
         "run_id": mv.run_id, "created": _iso(mv.creation_timestamp), "metrics": _tagged_metrics(mv.tags or {}),
         "tags": dict(mv.tags or {})}
        for mv in sorted(_versions(client, name), key=lambda v: int(v.version))
    ]
    tracked = sorted(set(aliases) | {k.split(".")[2] for k in model.tags if k.startswith("dcad.alias.")})
    return {"name": name, "aliases": aliases, "history": {a: alias_history(model, a) for a in tracked},
            "log": {a: alias_log(model, a) for a in tracked}, "versions": versions}


def _iso(millis: int | None) -> str | None:
    return datetime.fromtimestamp(millis / 1000, timezone.utc).isoformat(timespec="seconds") if millis else None
