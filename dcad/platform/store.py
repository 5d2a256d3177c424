"""Where runs and models live: the embedded default store, tracking URIs, reachability, experiments.

Default (no server): a sqlite database `./.dcad/mlflow.db` with artifacts under `./.dcad/artifacts`
(`DCAD_HOME` moves `./.dcad`). `--tracking-uri` or `MLFLOW_TRACKING_URI` selects a server instead.
MLflow 3 raises on `file:` stores, so they are refused here with a one-line hint.
"""

from __future__ import annotations

import hashlib
import os
import re
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator
from urllib.parse import urlparse

from dcad.platform.errors import TrackingError, describe
from dcad.platform.s3 import configure_s3_env

HOME_ENV = "DCAD_HOME"
DEFAULT_HOME = ".dcad"
DB_FILE = "mlflow.db"
ARTIFACTS_DIR = "artifacts"
DEFAULT_EXPERIMENT = "dcad"
REACHABILITY_TIMEOUT_S = 5.0
# MLflow retries a failed HTTP request 7 times with exponential backoff (minutes); a CLI should fail fast.
HTTP_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "60",
    "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true",  # stdout carries dcad's own output
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
}


def dcad_home() -> Path:
    """The local store directory: `$DCAD_HOME` or `./.dcad` (absolute)."""
    return Path(os.environ.get(HOME_ENV) or DEFAULT_HOME).expanduser().resolve()


def default_tracking_uri(home: Path | None = None) -> str:
    return f"sqlite:///{(home or dcad_home()) / DB_FILE}"


def requested_tracking_uri(explicit: str | None = None, configured: str | None = None) -> str | None:
    """`--tracking-uri`, else `MLFLOW_TRACKING_URI`, else a spec's `tracking_uri`; None: the default store."""
    return explicit or os.environ.get("MLFLOW_TRACKING_URI") or configured


def resolve_tracking_uri(explicit: str | None = None, configured: str | None = None) -> str:
    """`requested_tracking_uri`, else the embedded sqlite store."""
    return requested_tracking_uri(explicit, configured) or default_tracking_uri()


def is_server_uri(uri: str) -> bool:
    return urlparse(uri).scheme in ("http", "https")


def sqlite_path(uri: str) -> Path | None:
    """The database file of a `sqlite:///PATH` URI (None for other stores or in-memory sqlite)."""
    if not uri.startswith("sqlite:///"):
        return None
    path = uri[len("sqlite:///"):]
    return None if path in ("", ":memory:") else Path(path)


def absolute_uri(uri: str | None) -> str | None:
    """A relative `sqlite:///PATH` made absolute: other processes (Ray workers, Tune trials) run elsewhere."""
    prefix = "sqlite:///"
    if uri and uri.startswith(prefix) and not uri[len(prefix):].startswith("/"):
        return prefix + str(Path(uri[len(prefix):]).resolve())
    return uri


def artifact_root_for(uri: str) -> Path | None:
    """Local artifact root of a sqlite store: `artifacts/` next to the database (None for servers)."""
    db = sqlite_path(uri)
    return db.parent / ARTIFACTS_DIR if db is not None else None


def configure_client_env() -> None:
    """Fail-fast HTTP retries and S3-compatible checksums, unless the user already chose values."""
    for key, value in HTTP_DEFAULTS.items():
        os.environ.setdefault(key, value)
    configure_s3_env()


def check_store(uri: str, timeout: float = REACHABILITY_TIMEOUT_S) -> None:
    """Raise TrackingError (one line, no credentials) when the store cannot be used; create local dirs."""
    scheme = urlparse(uri).scheme
    if scheme in ("", "file"):
        raise TrackingError(
            f"tracking URI '{uri}': MLflow 3 no longer supports file stores; use sqlite:///PATH/mlflow.db or a server URL"
        )
    if scheme == "sqlite":
        _check_sqlite(uri)
    elif scheme in ("http", "https"):
        check_server(uri, timeout)


def _check_sqlite(uri: str) -> None:
    db = sqlite_path(uri)
    if db is None:
        return
    try:
        db.parent.mkdir(parents=True, exist_ok=True)
        (db.parent / ARTIFACTS_DIR).mkdir(exist_ok=True)
    except OSError as err:
        raise TrackingError(f"tracking store {db}: cannot create its directory ({err.strerror})") from None
    if not os.access(db.parent, os.W_OK):
        raise TrackingError(f"tracking store {db}: directory {db.parent} is not writable")


def check_server(uri: str, timeout: float = REACHABILITY_TIMEOUT_S) -> None:
    """GET /health on an MLflow server; any failure to connect becomes a TrackingError."""
    import requests

    url = uri.rstrip("/") + "/health"
    try:
        response = requests.get(url, timeout=timeout)
    except requests.RequestException as err:
        raise TrackingError(
            f"MLflow tracking server {uri} is unreachable ({describe(err)}); start it, fix --tracking-uri / "
            "MLFLOW_TRACKING_URI, or run without tracking (--no-track)"
        ) from None
    if response.status_code == 403 and "host" in response.text.lower():
        raise TrackingError(
            f"MLflow tracking server {uri} rejected this client's Host header; add it to the server's --allowed-hosts"
        )
    if response.status_code >= 500:
        raise TrackingError(f"MLflow tracking server {uri} is unhealthy (HTTP {response.status_code} on /health)")


def experiment_artifact_location(uri: str, name: str) -> str | None:
    """For sqlite stores: a per-experiment folder under the store's artifact root (servers decide themselves)."""
    root = artifact_root_for(uri)
    if root is None:
        return None
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-")[:60] or "experiment"
    suffix = hashlib.sha1(name.encode("utf-8")).hexdigest()[:8]
    return (root.resolve() / f"{slug}-{suffix}").as_uri()


def get_or_create_experiment(client, name: str, uri: str) -> str:
    """The id of experiment `name`, created (with a local artifact location for sqlite stores) if missing."""
    from mlflow.exceptions import MlflowException

    if not name or not name.strip():
        raise TrackingError("experiment name must not be empty")
    found = client.get_experiment_by_name(name)
    if found is not None:
        if found.lifecycle_stage == "deleted":
            raise TrackingError(f"experiment '{name}' is deleted; restore it in the MLflow UI or choose another name")
        return found.experiment_id
    try:
        return client.create_experiment(name, artifact_location=experiment_artifact_location(uri, name))
    except MlflowException:  # created concurrently by another process
        found = client.get_experiment_by_name(name)
        if found is None:
            raise
        return found.experiment_id


def mlflow_client(uri: str):
    """An MlflowClient bound to `uri` for tracking and registry (no global MLflow state)."""
    from mlflow import MlflowClient

    configure_client_env()
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


@contextmanager
def use_store(uri: str) -> Iterator[None]:
    """MLflow's global tracking and registry URIs set to `uri` inside the block (for fluent APIs such as
    `log_model` and `download_artifacts("models:/...")`, which ignore a client's URI), restored after."""
    import mlflow

    before = (mlflow.get_tracking_uri(), mlflow.get_registry_uri())
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(before[0])
        mlflow.set_registry_uri(before[1])


def open_store(explicit_uri: str | None = None, check: bool = True) -> tuple[str, object]:
    """Resolve the tracking URI, check it is usable, and return (uri, client)."""
    uri = resolve_tracking_uri(explicit_uri)
    if check:
        check_store(uri)
    return uri, mlflow_client(uri)


def run_link(uri: str, experiment_id: str, run_id: str) -> str | None:
    """The UI address of a run when a server is used (None for local stores)."""
    if not is_server_uri(uri):
        return None
    return f"{uri.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"
