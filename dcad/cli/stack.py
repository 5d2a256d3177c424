"""`dcad stack up|status|down`: a local MLflow + S3 + Ray stack on 127.0.0.1, without Docker."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from dcad.cli.console import console, err_console

app = typer.Typer(help="A local stack: MLflow (PostgreSQL or sqlite, artifacts on S3), an S3 endpoint and a Ray head.", no_args_is_help=True)


def _state_dir(value: Optional[Path]) -> Path:
    from dcad.platform.mlflow_store import dcad_home

    return (value or dcad_home() / "stack").resolve()


STATE_DIR_OPTION = typer.Option(None, "--state-dir", callback=_state_dir, help="Where the stack records what it started (default: ./.dcad/stack).")


def _log(message: str) -> None:
    err_console.print(f"[cyan]▸[/] {message}", highlight=False)


@app.command("up")
def up(
    state_dir: Path = STATE_DIR_OPTION,
    host: str = typer.Option("127.0.0.1", "--host", help="Address every service listens on."),
    mlflow_port: int = typer.Option(5000, "--mlflow-port"),
    s3_port: int = typer.Option(9000, "--s3-port"),
    ray_port: int = typer.Option(6379, "--ray-port"),
    postgres_port: int = typer.Option(5433, "--postgres-port", help="5432 is left to a system PostgreSQL."),
    backend: str = typer.Option("auto", "--backend", help="auto (PostgreSQL when found), postgres, or sqlite."),
    postgres_uri: Optional[str] = typer.Option(None, "--postgres-uri", envvar="DCAD_STACK_POSTGRES_URI",
                                               help="Use this PostgreSQL database instead of starting one."),
    postgres_bin: Optional[Path] = typer.Option(None, "--postgres-bin", help="Directory with initdb and postgres."),
    bucket: str = typer.Option("dcad-artifacts", "--bucket", help="S3 bucket for MLflow's artifacts."),
    no_ray: bool = typer.Option(False, "--no-ray", help="Do not start a Ray head."),
    ray_cpus: Optional[int] = typer.Option(None, "--ray-cpus", min=1, help="CPUs the Ray head offers (default: all)."),
    timeout: float = typer.Option(180.0, "--timeout", min=1.0, help="Seconds each service may take to start."),
) -> None:
    """Start PostgreSQL (when available), S3, MLflow and a Ray head; print the variables to export."""
    from dcad.platform.stack import StackError, StackOptions, up as start

    if backend not in ("auto", "postgres", "sqlite"):
        raise StackError(f"--backend {backend}: choose auto, postgres or sqlite")
    opts = StackOptions(
        state_dir, host=host, mlflow_port=mlflow_port, s3_port=s3_port, ray_port=ray_port,
        postgres_port=postgres_port, backend=backend, postgres_uri=postgres_uri, postgres_bin=postgres_bin,  # type: ignore[arg-type]
        bucket=bucket, ray=not no_ray, ray_cpus=ray_cpus, timeout_s=timeout,
    )
    state = start(opts, log=_log)
    console.print(f"stack up (state {state.path}); export:")
    console.print(_exports(state.env), highlight=False)


@app.command("status")
def status(
    state_dir: Path = STATE_DIR_OPTION,
    as_json: bool = typer.Option(False, "--json", help="Print the services and variables as JSON."),
) -> None:
    """The recorded services: pid, port, whether the process is alive and listening, URL; the variables to export."""
    from dcad.platform.stack import status as read_status

    state, rows = read_status(state_dir)
    running = bool(rows) and all(r["alive"] for r in rows)
    if as_json:
        payload = {"state": str(state_dir), "running": running, "env": state.env if state else {}, "services": rows}
        console.out(json.dumps(payload, indent=2), highlight=False)
        return
    if state is None:
        console.print(f"no stack recorded in {state_dir} (start one with `dcad stack up`)")
        raise typer.Exit(1)
    table = Table(title=f"dcad stack ({state_dir})", title_justify="left")
    for column in ("service", "pid", "port", "alive", "URL"):
        table.add_column(column, justify="right" if column in ("pid", "port") else "left")
    for r in rows:
        alive = "[green]yes[/]" if r["alive"] and r["listening"] else ("[yellow]not listening[/]" if r["alive"] else "[red]no[/]")
        table.add_row(r["service"], str(r["pid"]), str(r["port"]), alive, r["url"])
    console.print(table)
    console.print(_exports(state.env), highlight=False)
    if not all(r["alive"] for r in rows):
        raise typer.Exit(1)


@app.command("down")
def down(
    state_dir: Path = STATE_DIR_OPTION,
    purge: bool = typer.Option(False, "--purge", help="Also delete the PostgreSQL data (every run and model of the stack)."),
) -> None:
    """Stop exactly the processes `up` started (each checked by pid, start time and command line)."""
    from dcad.platform.stack import down as stop_all

    report = stop_all(state_dir, purge=purge, log=_log)
    console.print("stack down" if report else f"no stack recorded in {state_dir}")


def _exports(env: dict[str, str]) -> str:
    from dcad.platform.secrets import redact

    return "\n".join(f"export {k}={redact(v)}" for k, v in env.items())
