"""Real server processes for the MLflow tests: `moto_server` (S3 over HTTP) and `mlflow server` (sqlite).

Every server listens on 127.0.0.1 on a free port, in its own process group, and is stopped by the
fixture that started it. Import the fixtures from `tests/conftest.py`.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest
import requests

HOST = "127.0.0.1"
BUCKET = "dcad-test"
S3_CREDENTIALS = {  # moto accepts any keys; these are unique so a leak is easy to spot
    "AWS_ACCESS_KEY_ID": "AKIADCADTESTKEY7Q2Z",
    "AWS_SECRET_ACCESS_KEY": "dcadTestSecret/9f3Kq8ZrW1xLmN0pVb7Yt2Hc4Js6Ue",
    "AWS_SESSION_TOKEN": "dcadTestSessionToken-5aa1c2e9b7f04d6e8c3b",
    "AWS_DEFAULT_REGION": "us-east-1",
}
CHECKSUMS = {"AWS_REQUEST_CHECKSUM_CALCULATION": "when_required", "AWS_RESPONSE_CHECKSUM_VALIDATION": "when_required"}
START_TIMEOUT_S = 120


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def _executable(name: str) -> str:
    local = Path(sys.executable).with_name(name)
    found = str(local) if local.exists() else shutil.which(name)
    if not found:
        pytest.skip(f"{name} is not installed")
    return found


@dataclass
class ServerProcess:
    url: str
    proc: subprocess.Popen
    log: Path

    def tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self) -> None:
        """SIGTERM to the server's process group (it started workers), SIGKILL if it lingers."""
        if self.proc.poll() is not None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=15)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(timeout=10)


def _wait_ready(server: ServerProcess, path: str, timeout: float = START_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            raise RuntimeError(f"server exited with {server.proc.returncode}:\n{server.tail()}")
        try:
            if requests.get(server.url + path, timeout=2).status_code < 500:
                return
        except requests.RequestException:
            pass
        time.sleep(0.3)
    server.stop()
    raise RuntimeError(f"server at {server.url} not ready after {timeout} s:\n{server.tail()}")


@contextmanager
def start_process(cmd: list[str], url: str, ready_path: str, log: Path, env: dict[str, str] | None = None) -> Iterator[ServerProcess]:
    with log.open("ab") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    server = ServerProcess(url, proc, log)
    try:
        _wait_ready(server, ready_path)
        yield server
    finally:
        server.stop()


@contextmanager
def moto_s3(workdir: Path) -> Iterator[ServerProcess]:
    """moto's S3 over HTTP, with the test bucket created."""
    port = free_port()
    cmd = [_executable("moto_server"), "-H", HOST, "-p", str(port)]
    with start_process(cmd, f"http://{HOST}:{port}", "/moto-api/", workdir / "moto.log") as server:
        s3_client(server.url).create_bucket(Bucket=BUCKET)
        yield server


def s3_client(endpoint: str):
    from dcad.platform.s3 import s3_client as make

    keys = {k.lower(): v for k, v in S3_CREDENTIALS.items() if k != "AWS_DEFAULT_REGION"}
    return make(endpoint, region_name="us-east-1", **keys)


def mlflow_server_env(s3_endpoint: str | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "MLFLOW_"))}
    env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"
    if s3_endpoint:
        env.update({**S3_CREDENTIALS, **CHECKSUMS, "MLFLOW_S3_ENDPOINT_URL": s3_endpoint})
    return env


@contextmanager
def mlflow_server(
    workdir: Path,
    *,
    artifacts_destination: str | None = None,
    default_artifact_root: str | None = None,
    serve_artifacts: bool = True,
    s3_endpoint: str | None = None,
    port: int | None = None,
) -> Iterator[ServerProcess]:
    """`mlflow server` on a sqlite store in `workdir` with one worker and no job runners."""
    workdir.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    cmd = [
        sys.executable, "-m", "mlflow", "server",
        "--backend-store-uri", f"sqlite:///{workdir / 'mlflow.db'}",
        "--host", HOST, "--port", str(port), "--workers", "1",
    ]
    if serve_artifacts:
        cmd += ["--serve-artifacts", "--artifacts-destination", artifacts_destination or str(workdir / "artifacts")]
    else:
        cmd += ["--no-serve-artifacts"]
    if default_artifact_root:
        cmd += ["--default-artifact-root", default_artifact_root]
    with start_process(cmd, f"http://{HOST}:{port}", "/health", workdir / "mlflow-server.log", mlflow_server_env(s3_endpoint)) as server:
        yield server


# ---- pytest fixtures -------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def moto_endpoint(tmp_path_factory) -> Iterator[str]:
    with moto_s3(tmp_path_factory.mktemp("moto")) as server:
        yield server.url


@pytest.fixture(scope="session")
def proxied_server(tmp_path_factory, moto_endpoint) -> Iterator[ServerProcess]:
    """Server mode (a): the server proxies artifacts to s3://BUCKET/proxied; clients need no S3 keys."""
    with mlflow_server(
        tmp_path_factory.mktemp("mlflow-proxied"),
        artifacts_destination=f"s3://{BUCKET}/proxied",
        s3_endpoint=moto_endpoint,
    ) as server:
        yield server


@pytest.fixture(scope="session")
def direct_server(tmp_path_factory, moto_endpoint) -> Iterator[ServerProcess]:
    """Server mode (b): runs get s3://BUCKET/direct locations; clients write to S3 themselves."""
    with mlflow_server(
        tmp_path_factory.mktemp("mlflow-direct"),
        serve_artifacts=False,
        default_artifact_root=f"s3://{BUCKET}/direct",
    ) as server:
        yield server
