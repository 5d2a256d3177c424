"""`dcad ui`: the MLflow UI on the local store (127.0.0.1 by default), until Ctrl+C."""

from __future__ import annotations

import os
import signal
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
    from dcad.platform.mlflow_store import artifact_root_for, check_store, is_server_uri, resolve_tracking_uri
    from dcad.platform.stack.procs import free_ports, listening

    uri = resolve_tracking_uri(tracking_uri)
    if is_server_uri(uri):
        typer.echo(f"the tracking store is already a server: open {uri}")
        return
    check_store(uri)
    port = port or free_ports(1, host)[0]
    if listening(host, port):
        raise DcadError(f"port {port} on {host} is in use (pass another --port, or --port 0 for any free one)")
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri, "--host", host, "--port", str(port), "--workers", "1"]
    if root := artifact_root_for(uri):  # local artifacts, served by this server
        cmd += ["--default-artifact-root", str(root), "--artifacts-destination", str(root)]
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": os.environ.get("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")}
    rc = _serve_until_stopped(cmd, env, f"MLflow UI: http://{host}:{port}  (store {uri}; Ctrl+C to stop)")
    if rc not in (0, None):
        err_console.print(f"the MLflow UI stopped with exit code {rc}")
        raise typer.Exit(rc)


class _Stop(Exception):
    """SIGTERM or SIGINT reached `dcad ui`."""


def _serve_until_stopped(cmd: list[str], env: dict[str, str], banner: str) -> int | None:
    """Run the server in its own session until it exits (its code) or SIGINT/SIGTERM arrives (None): then it
    and every process it started (uvicorn workers …) are stopped, so none is left serving the port."""
    from dcad.platform.stack import procs

    def on_signal(signum, frame) -> None:
        raise _Stop()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    proc = None
    try:
        # Its own session: Ctrl+C reaches only this process, which then stops the server's whole family
        # (uvicorn then exits quietly instead of printing its CancelledError traceback).
        proc = subprocess.Popen(cmd, env=env, start_new_session=True)
        typer.echo(banner)
        return proc.wait()
    except _Stop:
        for sig in previous:
            signal.signal(sig, signal.SIG_IGN)
        if proc is not None:
            record = procs.identify(proc.pid)  # now: right after the spawn /proc may not show its command line yet
            if record is not None:
                procs.stop(record, grace_s=15.0)
            proc.wait(timeout=5)
        err_console.print("MLflow UI stopped")
        return None
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def register(app: typer.Typer) -> None:
    app.command("ui")(ui)
