"""Read-only views of the registry for `dcad models list|show`: versions, aliases, gate results, history."""

from __future__ import annotations

from datetime import datetime, timezone

from dcad.core.metrics import METRIC_KEYS
from dcad.platform.errors import RegistryError
from dcad.platform.registry import alias_history, alias_log, registered_model


def list_models(client) -> list[dict]:
    rows = []
    from dcad.platform.registry_lock import is_lock

    for model in client.search_registered_models():
        if is_lock(model):
            continue
        full = client.get_registered_model(model.name)  # search results lack aliases on database stores
        versions = client.search_model_versions(f"name='{model.name}'")
        rows.append(
            {
                "name": full.name,
                "versions": len(versions),
                "latest": max((int(v.version) for v in versions), default=None),
                "aliases": {a: str(v) for a, v in (full.aliases or {}).items()},
                "updated": _iso(full.last_updated_timestamp),
            }
        )
    return sorted(rows, key=lambda r: r["name"])


def show_model(client, name: str) -> dict:
    model = registered_model(client, name)
    if model is None:
        raise RegistryError(f"registered model '{name}' not found")
    by_version: dict[str, list[str]] = {}
    for alias, version in (model.aliases or {}).items():
        by_version.setdefault(str(version), []).append(alias)
    versions = []
    for mv in sorted(client.search_model_versions(f"name='{name}'"), key=lambda v: int(v.version)):
        tags = mv.tags or {}
        versions.append(
            {
                "version": str(mv.version),
                "aliases": sorted(by_version.get(str(mv.version), [])),
                "run_id": mv.run_id,
                "created": _iso(mv.creation_timestamp),
                "metrics": {k: float(tags[f"dcad.metric.{k}"]) for k in METRIC_KEYS if f"dcad.metric.{k}" in tags},
                "tags": dict(tags),
            }
        )
    aliases = sorted({a for a in model.aliases or {}} | {k.split(".")[2] for k in model.tags if k.startswith("dcad.alias.")})
    return {
        "name": name,
        "aliases": {a: str(v) for a, v in (model.aliases or {}).items()},
        "history": {a: alias_history(model, a) for a in aliases},
        "log": {a: alias_log(model, a) for a in aliases},
        "versions": versions,
    }


def _iso(millis: int | None) -> str | None:
    if not millis:
        return None
    return datetime.fromtimestamp(millis / 1000, timezone.utc).isoformat(timespec="seconds")
