"""`dcad ui`: the MLflow UI on the local store (127.0.0.1 by default), until Ctrl+C."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from typing import Optional

import typer

from dcad.cli.console import err_console
from dcad.cli.tracking import TRACKING_URI_OPTION


def ui(
    port: int = typer.Option(5000, "--port", "-p", help="Port (0: any free port)."),
    host: str = typer.Option("127.0.0.1", "--host", help="Interface to listen on."),
    tracking_uri: Optional[str] = TRACKING_URI_OPTION,
) -> None:
    """Start the MLflow UI on the local sqlite store and print its address."""
    from dcad.core.errors import DcadError
    from dcad.platform.store import artifact_root_for, check_store, is_server_uri, resolve_tracking_uri

    uri = resolve_tracking_uri(tracking_uri)
    if is_server_uri(uri):
        typer.echo(f"the tracking store is already a server: open {uri}")
        return
    check_store(uri)
    port = port or free_port(host)
    if not port_is_free(host, port):
        raise DcadError(f"port {port} on {host} is in use (pass another --port, or --port 0 for any free one)")
    cmd = server_command(uri, str(artifact_root_for(uri) or ""), host, port)
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": os.environ.get("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")}
    rc = serve_until_stopped(cmd, env, f"MLflow UI: http://{host}:{port}  (store {uri}; Ctrl+C to stop)")
    if rc not in (0, None):
        err_console.print(f"the MLflow UI stopped with exit code {rc}")
        raise typer.Exit(rc)


class _Stop(Exception):
    """SIGTERM or SIGINT reached `dcad ui`."""


def serve_until_stopped(cmd: list[str], env: dict[str, str], banner: str) -> int | None:
    """Run the server in its own session until it exits (its code) or SIGINT/SIGTERM arrives (None): then it
    and every process it started (uvicorn workers …) are stopped, so none is left serving the port."""
    from dcad.platform.stack import procs

    def on_signal(signum, frame) -> None:
        raise _Stop()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    proc = record = None
    try:
        # Its own session: Ctrl+C reaches only this process, which then stops the server's whole family
        # (uvicorn then exits quietly instead of printing its CancelledError traceback).
        proc = subprocess.Popen(cmd, env=env, start_new_session=True)
        record = procs.identify(proc.pid)
        typer.echo(banner)
        return proc.wait()
    except _Stop:
        for sig in previous:
            signal.signal(sig, signal.SIG_IGN)
        if record is not None:
            procs.stop(record, grace_s=15.0)
        if proc is not None:
            proc.wait(timeout=5)
        err_console.print("MLflow UI stopped")
        return None
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def server_command(uri: str, artifact_root: str, host: str, port: int) -> list[str]:
    """`mlflow server` on a local store: one worker, local artifacts, no job runners."""
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri, "--host", host, "--port", str(port), "--workers", "1"]
    if artifact_root:
        cmd += ["--default-artifact-root", artifact_root, "--artifacts-destination", artifact_root]
    return cmd


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def port_is_free(host: str, port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def register(app: typer.Typer) -> None:
    app.command("ui")(ui)
