"""The MLflow store runs and models live in: tracking URI, usability check, client, experiments (docs/cluster.md §4)."""

from __future__ import annotations

import getpass
import hashlib
import os
import re
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator
from urllib.parse import urlparse

from dcad.platform.errors import TrackingError, describe
from dcad.platform.storage import configure_s3_env

ARTIFACTS_DIR = "artifacts"
DEFAULT_EXPERIMENT = "dcad"
SQLITE = "sqlite:///"
REACHABILITY_TIMEOUT_S = 5.0
# MLflow retries a failed HTTP request 7 times with exponential backoff (minutes); a CLI should fail fast.
HTTP_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1", "MLFLOW_HTTP_REQUEST_TIMEOUT": "60",
    "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true",  # stdout carries dcad's own output
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
}


def who() -> str:
    """The user recorded as the author of runs and registry changes."""
    try:
        return getpass.getuser()
    except Exception:  # noqa: BLE001 - no user database in some containers
        return "unknown"


def dcad_home() -> Path:
    """The local store directory: `$DCAD_HOME` or `./.dcad` (absolute)."""
    return Path(os.environ.get("DCAD_HOME") or ".dcad").expanduser().resolve()


def default_tracking_uri() -> str:
    return f"{SQLITE}{dcad_home() / 'mlflow.db'}"


def requested_tracking_uri(explicit: str | None = None, configured: str | None = None) -> str | None:
    """`--tracking-uri`, else `MLFLOW_TRACKING_URI`, else a spec's `tracking_uri`; None: the default store."""
    return explicit or os.environ.get("MLFLOW_TRACKING_URI") or configured


def resolve_tracking_uri(explicit: str | None = None, configured: str | None = None) -> str:
    return requested_tracking_uri(explicit, configured) or default_tracking_uri()


def is_server_uri(uri: str) -> bool:
    return urlparse(uri).scheme in ("http", "https")


def _sqlite_path(uri: str | None) -> Path | None:
    """The database file of a `sqlite:///PATH` URI (None for other stores or in-memory sqlite)."""
    path = uri[len(SQLITE):] if uri and uri.startswith(SQLITE) else ""
    return Path(path) if path not in ("", ":memory:") else None


def absolute_uri(uri: str | None) -> str | None:
    """A relative `sqlite:///PATH` made absolute: other processes (Ray workers, Tune trials) run elsewhere."""
    db = _sqlite_path(uri)
    return SQLITE + str(db.resolve()) if db is not None and not db.is_absolute() else uri


def artifact_root_for(uri: str) -> Path | None:
    """Local artifact root of a sqlite store: `artifacts/` next to the database (None for servers)."""
    db = _sqlite_path(uri)
    return db.parent / ARTIFACTS_DIR if db is not None else None


def check_store(uri: str) -> None:
    """Raise TrackingError (one line, no credentials) when the store cannot be used; create local dirs."""
    if urlparse(uri).scheme in ("", "file"):
        raise TrackingError(
            f"tracking URI '{uri}': MLflow 3 no longer supports file stores; use sqlite:///PATH/mlflow.db or a server URL")
    db = _sqlite_path(uri)
    if db is not None:
        try:
            (db.parent / ARTIFACTS_DIR).mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise TrackingError(f"tracking store {db}: cannot create its directory ({err.strerror})") from None
        if not os.access(db.parent, os.W_OK):
            raise TrackingError(f"tracking store {db}: directory {db.parent} is not writable")
    if not is_server_uri(uri):
        return
    import requests

    try:
        response = requests.get(uri.rstrip("/") + "/health", timeout=REACHABILITY_TIMEOUT_S)
    except requests.RequestException as err:
        raise TrackingError(
            f"MLflow tracking server {uri} is unreachable ({describe(err)}); start it, fix --tracking-uri / "
            "MLFLOW_TRACKING_URI, or run without tracking (--no-track)") from None
    if response.status_code == 403 and "host" in response.text.lower():
        raise TrackingError(
            f"MLflow tracking server {uri} rejected this client's Host header; add it to the server's --allowed-hosts")
    if response.status_code >= 500:
        raise TrackingError(f"MLflow tracking server {uri} is unhealthy (HTTP {response.status_code} on /health)")


def get_or_create_experiment(client, name: str, uri: str) -> str:
    """The id of experiment `name`, created if missing (on a sqlite store with its own artifact folder)."""
    from mlflow.exceptions import MlflowException

    if not name or not name.strip():
        raise TrackingError("experiment name must not be empty")
    found = client.get_experiment_by_name(name)
    if found is not None and found.lifecycle_stage == "deleted":
        raise TrackingError(f"experiment '{name}' is deleted; restore it in the MLflow UI or choose another name")
    if found is not None:
        return found.experiment_id
    root, location = artifact_root_for(uri), None
    if root is not None:
        slug = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-")[:60] or "experiment"
        location = (root.resolve() / f"{slug}-{hashlib.sha1(name.encode('utf-8')).hexdigest()[:8]}").as_uri()
    try:
        return client.create_experiment(name, artifact_location=location)
    except MlflowException:  # created concurrently by another process
        found = client.get_experiment_by_name(name)
        if found is None:
            raise
        return found.experiment_id


def mlflow_client(uri: str):
    """An MlflowClient for tracking and registry at `uri`, with fail-fast HTTP retries and S3 settings (values the
    user set are kept)."""
    from mlflow import MlflowClient

    for key, value in HTTP_DEFAULTS.items():
        os.environ.setdefault(key, value)
    configure_s3_env()
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


@contextmanager
def use_store(uri: str) -> Iterator[None]:
    """MLflow's global tracking and registry URIs set to `uri` inside the block (for fluent APIs such as
    `log_model` and `download_artifacts("models:/...")`, which ignore a client's URI)."""
    import mlflow

    before = (mlflow.get_tracking_uri(), mlflow.get_registry_uri())
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(before[0])
        mlflow.set_registry_uri(before[1])


def open_store(explicit_uri: str | None = None) -> tuple[str, object]:
    """Resolve the tracking URI, check it is usable, and return (uri, client)."""
    uri = resolve_tracking_uri(explicit_uri)
    check_store(uri)
    return uri, mlflow_client(uri)


def run_link(uri: str, experiment_id: str, run_id: str) -> str | None:
    """The UI address of a run when a server is used (None for local stores)."""
    return f"{uri.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}" if is_server_uri(uri) else None
