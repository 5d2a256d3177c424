"""`dcad ui`: the MLflow UI on the local store (127.0.0.1 by default), until Ctrl+C."""

from __future__ import annotations

import os
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
    proc = subprocess.Popen(cmd, env=env)
    typer.echo(f"MLflow UI: http://{host}:{port}  (store {uri}; Ctrl+C to stop)")
    try:
        rc = proc.wait()
    except KeyboardInterrupt:
        proc.terminate()
        proc.wait(timeout=20)
        return
    if rc != 0:
        err_console.print(f"the MLflow UI stopped with exit code {rc}")
        raise typer.Exit(rc)


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
