"""How each stack service is started and when it counts as ready: PostgreSQL, S3 (moto_server), MLflow, Ray head."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from dcad.platform.secrets import redact
from dcad.platform.stack import postgres
from dcad.platform.stack.errors import StackError
from dcad.platform.stack.procs import free_port, identify, listening, spawn, stop
from dcad.platform.stack.state import ServiceRecord

CHECKSUMS = {"AWS_REQUEST_CHECKSUM_CALCULATION": "when_required", "AWS_RESPONSE_CHECKSUM_VALIDATION": "when_required"}
REGION = "us-east-1"


@dataclass
class Launch:
    """One service to start: command, environment, and a readiness probe."""

    name: str
    cmd: list[str]
    env: dict[str, str]
    host: str
    port: int
    url: str
    log: Path
    ready: Callable[[], bool]
    user: str | None = None
    details: dict = field(default_factory=dict)
    cwd: Path | None = None


def launch(item: Launch, timeout: float) -> ServiceRecord:
    """Start the service and wait until its probe passes (see `wait_ready`)."""
    return wait_ready(item, start(item), timeout)


def start(item: Launch) -> subprocess.Popen:
    """Start the service without waiting (services that do not depend on each other start together)."""
    return spawn(item.cmd, item.log, item.env, user=item.user, cwd=item.cwd)


def wait_ready(item: Launch, proc: subprocess.Popen, timeout: float) -> ServiceRecord:
    """Wait until the probe passes; StackError (naming its log) if the process exits or the time runs out."""
    deadline = time.monotonic() + timeout
    while not _probe(item):
        if proc.poll() is not None:
            raise StackError(f"{item.name} exited with code {proc.returncode} while starting: {_last_line(item.log)} (log {item.log})")
        if time.monotonic() > deadline:
            who = identify(proc.pid)
            if who is not None:
                stop(who)
            raise StackError(f"{item.name} was not ready on port {item.port} after {timeout:.0f} s (log {item.log})")
        time.sleep(0.3)
    who = identify(proc.pid)
    if who is None:
        raise StackError(f"{item.name} (pid {proc.pid}) disappeared right after starting (log {item.log})")
    return ServiceRecord(item.name, who.pid, who.start_time, list(who.cmdline), item.host, item.port, item.url, str(item.log), item.details)


def _probe(item: Launch) -> bool:
    try:
        return bool(item.ready())
    except Exception:  # noqa: BLE001 - not ready yet (connection refused, half-started server)
        return False


def _last_line(log: Path) -> str:
    try:
        lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return "no log"
    return redact(lines[-1])[:300] if lines else "no output"


def _http_ok(url: str) -> bool:
    import requests

    return requests.get(url, timeout=2).status_code < 500


def executable(name: str) -> str:
    """A console script of this environment (next to the interpreter), else from PATH."""
    local = Path(sys.executable).with_name(name)
    found = str(local) if local.exists() else shutil.which(name)
    if not found:
        raise StackError(f"'{name}' is not installed in this environment (pip install 'dcad[dev]')")
    return found


def clean_env(drop: tuple[str, ...] = ("AWS_", "MLFLOW_", "RAY_ADDRESS")) -> dict[str, str]:
    """This process's environment without credentials and client settings the services must not inherit."""
    return {k: v for k, v in os.environ.items() if not k.startswith(drop)}


# ---- the services ------------------------------------------------------------------------------------
def postgres_launch(binaries: postgres.PostgresBinaries, state_dir: Path, host: str, port: int) -> Launch:
    user = postgres.run_as_user()
    data_dir = postgres.data_dir_for(state_dir, user)
    log = state_dir / "postgres.log"
    postgres.init_cluster(binaries, data_dir, user, log)
    env = {k: v for k, v in clean_env().items() if not k.startswith("PG")}
    return Launch("postgres", postgres.server_command(binaries, data_dir, host, port), env, host, port,
                  postgres.backend_uri(host, port), log, lambda: listening(host, port), user,
                  {"data_dir": str(data_dir), "run_as": user or "", "bin_dir": str(binaries.bin_dir)}, cwd=data_dir)


def s3_launch(state_dir: Path, host: str, port: int) -> Launch:
    url = f"http://{host}:{port}"
    return Launch("s3", [executable("moto_server"), "-H", host, "-p", str(port)], clean_env(), host, port, url,
                  state_dir / "s3.log", lambda: _http_ok(url + "/moto-api/"), details={"kind": "moto_server (objects kept in STATE_DIR/s3-data across down/up)"})


def s3_credentials() -> dict[str, str]:
    """Throw-away keys for the local S3 endpoint (moto accepts any); passed to the MLflow server only, never stored."""
    import secrets

    return {"AWS_ACCESS_KEY_ID": "dcadstack" + secrets.token_hex(6), "AWS_SECRET_ACCESS_KEY": secrets.token_urlsafe(30),
            "AWS_DEFAULT_REGION": REGION}


def create_bucket(endpoint: str, bucket: str, credentials: dict[str, str]) -> None:
    from dcad.platform.s3 import s3_client

    client = s3_client(endpoint, aws_access_key_id=credentials["AWS_ACCESS_KEY_ID"],
                       aws_secret_access_key=credentials["AWS_SECRET_ACCESS_KEY"], region_name=REGION)
    existing = {b["Name"] for b in client.list_buckets().get("Buckets", [])}
    if bucket not in existing:
        client.create_bucket(Bucket=bucket)


def mlflow_launch(state_dir: Path, host: str, port: int, backend_uri: str, artifacts: str, s3_endpoint: str,
                  credentials: dict[str, str]) -> Launch:
    """The backend URI travels in the environment (MLFLOW_BACKEND_STORE_URI), so no password shows in `ps`."""
    url = f"http://{host}:{port}"
    allowed = ",".join([f"{host}:{port}", f"localhost:{port}", host, "localhost"])
    cmd = [sys.executable, "-m", "mlflow", "server", "--host", host, "--port", str(port), "--workers", "1",
           "--serve-artifacts", "--artifacts-destination", artifacts, "--allowed-hosts", allowed]
    env = {**clean_env(), **credentials, **CHECKSUMS, "MLFLOW_BACKEND_STORE_URI": backend_uri,
           "MLFLOW_S3_ENDPOINT_URL": s3_endpoint, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    return Launch("mlflow", cmd, env, host, port, url, state_dir / "mlflow.log", lambda: _http_ok(url + "/health"),
                  details={"backend": redact(backend_uri), "artifacts_destination": artifacts})


def ray_launch(state_dir: Path, host: str, port: int, tracking_uri: str, cpus: int | None, object_store_mb: int) -> Launch:
    """`ray start --head --block` with every auxiliary port chosen free and a private temp dir (short: unix sockets)."""
    temp_dir = tempfile.mkdtemp(prefix="dcad-stack-ray-", dir="/tmp")
    log = state_dir / "ray.log"
    cmd = [executable("ray"), "start", "--head", "--block", "--disable-usage-stats", "--node-ip-address", host,
           "--port", str(port), "--temp-dir", temp_dir, "--include-dashboard", "false",
           "--object-store-memory", str(object_store_mb * 1024 * 1024), *_ray_ports(host)]
    if cpus is not None:
        cmd += ["--num-cpus", str(cpus)]
    env = {**clean_env(("AWS_", "MLFLOW_", "RAY_ADDRESS")), "RAY_USAGE_STATS_ENABLED": "0", "MLFLOW_TRACKING_URI": tracking_uri}
    offset = log.stat().st_size if log.exists() else 0
    return Launch("ray", cmd, env, host, port, f"{host}:{port}", log, lambda: listening(host, port) and _started(log, offset),
                  details={"temp_dir": temp_dir})


def _ray_ports(host: str) -> list[str]:
    names = ("--node-manager-port", "--object-manager-port", "--dashboard-agent-listen-port", "--dashboard-agent-grpc-port",
             "--metrics-export-port", "--runtime-env-agent-port", "--dashboard-port")  # 8265 may be another head's
    return [item for name in names for item in (name, str(free_port(host)))]


def _started(log: Path, offset: int) -> bool:
    with log.open("rb") as fh:
        fh.seek(offset)
        return b"Ray runtime started" in fh.read()
