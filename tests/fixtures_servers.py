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


_GIVEN: set[int] = set()


def free_port() -> int:
    """A port free now and not handed out before in this session: the kernel may give a just-closed port again, and
    two components of one Ray node on the same port make `ray start` fail."""
    while True:
        with socket.socket() as s:
            s.bind((HOST, 0))
            port = s.getsockname()[1]
        if port not in _GIVEN:
            _GIVEN.add(port)
            return port


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
    from dcad.platform.storage import s3_client as make

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


# ---- an endpoint that goes away: a loopback TCP proxy that can stop listening ------------------------
class OutageProxy:
    """127.0.0.1:PORT forwarded to `target` (host, port); `down()` closes the listener and every open
    connection (clients see connection refused), `up()` listens again on the same port."""

    def __init__(self, target_url: str) -> None:
        from urllib.parse import urlparse

        parsed = urlparse(target_url)
        self.target = (parsed.hostname, parsed.port)
        self.cut_after: int | None = None  # bytes sent upstream after which the proxy goes down by itself
        self.sent = 0
        self.port = free_port()
        self.url = f"http://{HOST}:{self.port}"
        self._listener: socket.socket | None = None
        self._conns: list[socket.socket] = []
        self._lock = __import__("threading").Lock()

    def up(self) -> "OutageProxy":
        import threading

        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((HOST, self.port))
        listener.listen(64)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()
        return self

    def down(self) -> None:
        with self._lock:
            listener, self._listener = self._listener, None
            conns, self._conns = self._conns, []
        if listener is not None:
            listener.close()
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            conn.close()

    def _accept(self, listener: socket.socket) -> None:
        import threading

        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # closed by down()
            try:
                upstream = socket.create_connection(self.target, timeout=10)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._conns += [client, upstream]
            for a, b, counted in ((client, upstream, True), (upstream, client, False)):
                threading.Thread(target=self._pipe, args=(a, b, counted), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, counted: bool) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                dst.sendall(data)
                if counted:
                    self.sent += len(data)
                    if self.cut_after is not None and self.sent >= self.cut_after:
                        self.cut_after = None
                        self.down()  # mid-request: the upload in flight loses its connection
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
