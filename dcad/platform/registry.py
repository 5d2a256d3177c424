"""The model registry: gated promotion of a run's model to an alias, rollback, and what versions hold.

`promote` checks every input first (name, alias, run, its logged model, the evaluation data) and
evaluates both models before it writes anything, so a bad request leaves the registry unchanged.
It then registers the run's model (reusing the version when that model is already registered),
tags the version with its lineage, the gate decision and the metrics, and moves the alias only when
the gate passed (or `force`). The holders of each alias are kept, in order, in the registered
model's tag `dcad.alias.<alias>.history`; `rollback` moves the alias back to the previous one.
"""

from __future__ import annotations

import getpass
import json
import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

from dcad.core.metrics import METRIC_KEYS
from dcad.platform.errors import RegistryError
from dcad.platform.gate import DEFAULT_FLOOR, DEFAULT_GATE_METRICS, DEFAULT_TOLERANCE, GateResult, check_gate
from dcad.platform.store import use_store

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,254}$")
ALIAS_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]{0,254}$")
RESERVED_ALIAS = re.compile(r"^(latest|v\d+)$", re.IGNORECASE)
EVENT_LOG_LIMIT = 200

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
    moved: bool
    forced: bool
    data: Path
    notes: list[str] = field(default_factory=list)
    candidate: dict = field(default_factory=dict)

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


def now_utc() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def who() -> str:
    try:
        return getpass.getuser()
    except Exception:  # noqa: BLE001 - no user database in some containers
        return "unknown"


# ---- validation ------------------------------------------------------------------------------------
def validate_name(client, name: str) -> bool:
    """True if the registered model exists; RegistryError for a name dcad would not create."""
    from dcad.platform.registry_lock import SUFFIX

    if name.endswith(SUFFIX):
        raise RegistryError(f"invalid model name '{name}': names ending in '{SUFFIX}' are dcad's write locks")
    if registered_model(client, name) is not None:
        return True
    if not name or not NAME_RE.match(name):
        raise RegistryError(
            f"invalid model name '{name}': use letters, digits, '_', '-' and '.', starting with a letter or digit"
        )
    return False


def validate_alias(alias: str) -> None:
    if not alias or not ALIAS_RE.match(alias) or RESERVED_ALIAS.match(alias):
        raise RegistryError(
            f"invalid alias '{alias}': use letters, digits, '_' and '-' (e.g. champion, challenger); "
            "'latest' and v<N> are reserved"
        )


def registered_model(client, name: str):
    from mlflow.exceptions import MlflowException

    if not name:
        return None
    try:
        return client.get_registered_model(name)
    except MlflowException as err:
        if err.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            return None
        raise


def alias_holder(client, name: str, alias: str):
    """The model version holding `alias`, or None (no such model or alias)."""
    model = registered_model(client, name)
    if model is None or alias not in (model.aliases or {}):
        return None
    return client.get_model_version(name, model.aliases[alias])


def source_run(client, run_id: str):
    """The run with this id, else the one run with this name (what `dcad leaderboard` shows), or the run
    behind a registered version given as `models:/NAME@ALIAS` or `models:/NAME/VERSION`."""
    from mlflow.exceptions import MlflowException

    if run_id.startswith("models:/"):
        return client.get_run(_version_run_id(client, run_id))
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


def _version_run_id(client, uri: str) -> str:
    from mlflow.exceptions import MlflowException

    ref = uri[len("models:/"):]
    name, sep, alias = ref.partition("@")
    try:
        if sep:
            version = alias_holder(client, name, alias)
        else:
            name, _, number = ref.rpartition("/")
            version = client.get_model_version(name, number)
    except MlflowException:
        version = None
    if version is None:
        raise RegistryError(f"--run {uri}: no such registered model version")
    if not version.run_id:
        raise RegistryError(f"--run {uri}: the version records no source run")
    return version.run_id


def run_model_id(run) -> str:
    outputs = run.outputs.model_outputs if run.outputs else []
    if not outputs:
        raise RegistryError(
            f"run {run.info.run_id} has no logged model (log the model directory with: dcad log MODEL_DIR --run-id {run.info.run_id})"
        )
    return outputs[-1].model_id


def run_dataset_root(run) -> Path | None:
    """The training dataset recorded with the run (MLflow dataset input, else the dcad.dataset_root tag)."""
    for item in run.inputs.dataset_inputs if run.inputs else []:
        try:
            uri = json.loads(item.dataset.source).get("uri")
        except (ValueError, AttributeError):
            continue
        if uri and "://" not in uri:
            return Path(uri)
    root = run.data.tags.get("dcad.dataset_root")
    return Path(root) if root else None


def evaluation_data(run, data: Path | None) -> Path:
    root = data or run_dataset_root(run)
    if root is None:
        raise RegistryError(f"run {run.info.run_id} has no recorded dataset; pass the evaluation data with --data")
    if not root.is_dir():
        raise RegistryError(f"evaluation data {root}: no such directory (pass --data)")
    return root


# ---- promotion -------------------------------------------------------------------------------------
def promote(client, request: PromotionRequest, evaluate: Evaluate, log=None) -> PromotionResult:
    """Gate the run's model against the alias holder; register, tag, and move the alias if allowed.

    The candidate is evaluated first; then, holding the model's write lock (`registry_lock`), the holder
    is read, the gate decided against it and every write made, so that concurrent promotions of one model
    each decide against the holder of their moment and every move lands in the alias history. `log` is told
    when another writer holds the lock."""
    from dcad.platform.registry_lock import model_lock

    validate_name(client, request.name)
    validate_alias(request.alias)
    run = source_run(client, request.run_id)
    model_id = run_model_id(run)
    data = evaluation_data(run, request.data)
    digest = _digest(data)
    candidate = evaluate(f"models:/{model_id}", data)
    with model_lock(client, request.name, log=log):
        return _decide_and_write(client, request, run, model_id, data, digest, candidate, evaluate)


def _decide_and_write(client, request: PromotionRequest, run, model_id: str, data: Path, digest: str, candidate: dict,
                      evaluate: Evaluate) -> PromotionResult:
    exists = registered_model(client, request.name) is not None
    holder = alias_holder(client, request.name, request.alias) if exists else None
    incumbent = None
    if holder is not None:
        incumbent = recorded_metrics(holder, digest) if request.reuse_recorded else None
        incumbent = incumbent or evaluate(f"models:/{request.name}/{holder.version}", data)
    gate = check_gate(candidate, incumbent, tuple(request.gate_metrics), request.tolerance, request.floor)

    if not exists:
        client.create_registered_model(request.name, tags={"dcad.created_by": who()})
    version = _version_for(client, request.name, run, model_id)
    moved = gate.passed or request.force
    result = PromotionResult(
        request.name, request.alias, str(version.version), str(holder.version) if holder else None, gate, moved,
        request.force and not gate.passed, data, candidate=candidate,
    )
    if result.previous == result.version:
        result.notes.append(f"version {result.version} already holds '{request.alias}'")
    if run.data.tags.get("dcad.dataset_digest") not in (None, digest):
        result.notes.append(f"evaluated on {data}, which differs from the run's training dataset")
    _tag_version(client, request, run, result, candidate, digest)
    if moved:
        client.set_registered_model_alias(request.name, request.alias, result.version)
    _record(client, request.name, request.alias, result.decision, result.version, result.previous, push=moved)
    return result


def version_model_id(version) -> str | None:
    """The logged model behind a version (database stores leave `model_id` empty; the source names it)."""
    model_id = getattr(version, "model_id", None)
    if model_id:
        return model_id
    source = version.source or ""
    return source[len("models:/"):] if source.startswith("models:/m-") else None


def _version_for(client, name: str, run, model_id: str):
    """The existing version of this logged model, else a new one."""
    for mv in client.search_model_versions(f"name='{name}'"):
        if version_model_id(mv) == model_id:
            return mv
    # The registry resolves a models:/ source through MLflow's global tracking URI, not the client's.
    with use_store(client.tracking_uri):
        return client.create_model_version(
            name, source=f"models:/{model_id}", run_id=run.info.run_id, model_id=model_id,
            tags={"dcad.registered_by": who(), "dcad.registered_at": now_utc()},
        )


def _digest(data: Path) -> str:
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
    return {"categories": categories, "mean": {k: float(tags[f"dcad.metric.{k}"]) for k in METRIC_KEYS if f"dcad.metric.{k}" in tags}}


def _tag_version(client, request: PromotionRequest, run, result: PromotionResult, metrics: dict, digest: str) -> None:
    tags = run.data.tags
    values = {
        "dcad.source_run": run.info.run_id,
        "dcad.source_experiment": run.info.experiment_id,
        "dcad.sweep": tags.get("dcad.sweep") or tags.get("mlflow.parentRunId"),
        "dcad.dataset_digest": tags.get("dcad.dataset_digest"),
        "dcad.eval_data": str(result.data),
        "dcad.eval_dataset_digest": digest,
        "dcad.metrics.per_category": json.dumps(metrics.get("categories", {}), allow_nan=True),
        **{f"dcad.metric.{k}": f"{metrics['mean'][k]:.6f}" for k in METRIC_KEYS if k in metrics.get("mean", {})},
        **_gate_tags(request, result),
    }
    for key, value in values.items():
        if value is not None:
            client.set_model_version_tag(request.name, result.version, key, str(value))


def _gate_tags(request: PromotionRequest, result: PromotionResult) -> dict[str, str]:
    prefix = f"dcad.gate.{request.alias}"
    regressions = [r.to_dict() for r in result.gate.regressions]
    return {
        f"{prefix}.result": result.decision,
        f"{prefix}.against": result.previous or "",
        f"{prefix}.metrics": ",".join(result.gate.metrics),
        f"{prefix}.tolerance": f"{result.gate.tolerance:g}",
        f"{prefix}.floor": f"{result.gate.floor:g}",
        f"{prefix}.below_floor": json.dumps(result.gate.below_floor, allow_nan=True),
        f"{prefix}.regressions": json.dumps(regressions, allow_nan=True),
        f"{prefix}.forced": "true" if result.forced else "false",
        f"{prefix}.by": who(),
        f"{prefix}.at": now_utc(),
    }


# ---- alias history and rollback ----------------------------------------------------------------------
def history_key(alias: str) -> str:
    return f"dcad.alias.{alias}.history"


def log_key(alias: str) -> str:
    return f"dcad.alias.{alias}.log"


def alias_history(model, alias: str) -> list[str]:
    try:
        return [str(v) for v in json.loads(model.tags.get(history_key(alias), "[]"))]
    except ValueError:
        return []


def alias_log(model, alias: str) -> list[dict]:
    try:
        return list(json.loads(model.tags.get(log_key(alias), "[]")))
    except ValueError:
        return []


def _record(client, name: str, alias: str, event: str, version: str, previous: str | None, push: bool) -> None:
    model = client.get_registered_model(name)
    history = alias_history(model, alias)
    if push:
        if previous and (not history or history[-1] != previous):
            history.append(previous)  # the alias was moved outside dcad: keep its holder in the history
        if not history or history[-1] != version:
            history.append(version)
    log = alias_log(model, alias) + [{"event": event, "version": version, "from": previous, "by": who(), "at": now_utc()}]
    client.set_registered_model_tag(name, history_key(alias), json.dumps(history))
    client.set_registered_model_tag(name, log_key(alias), json.dumps(log[-EVENT_LOG_LIMIT:]))


def rollback(client, name: str, alias: str) -> tuple[str, str]:
    """Move `alias` back to its previous holder; returns (from_version, to_version)."""
    from dcad.platform.registry_lock import model_lock

    validate_alias(alias)
    if registered_model(client, name) is None:
        raise RegistryError(f"registered model '{name}' not found")
    with model_lock(client, name):
        return _roll_back(client, name, alias)


def _roll_back(client, name: str, alias: str) -> tuple[str, str]:
    model = registered_model(client, name)
    if model is None:
        raise RegistryError(f"registered model '{name}' not found")
    current = (model.aliases or {}).get(alias)
    if current is None:
        raise RegistryError(f"model '{name}' has no alias '{alias}' to roll back")
    history = alias_history(model, alias)
    while history and history[-1] == str(current):
        history.pop()
    if not history:
        raise RegistryError(f"alias '{alias}' of '{name}' has no previous holder (version {current} is the first)")
    target = history[-1]
    client.set_registered_model_alias(name, alias, target)
    client.set_registered_model_tag(name, history_key(alias), json.dumps(history))
    _record(client, name, alias, "rollback", target, str(current), push=False)
    when = f"{who()} {now_utc()}"
    client.set_model_version_tag(name, str(current), f"dcad.gate.{alias}.rolled_back", when)
    return str(current), target
