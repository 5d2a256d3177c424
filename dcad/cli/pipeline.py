"""`dcad pipeline run FILE [--dry-run] [--resume]`: run a declarative pipeline from `pipelines/`."""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path
from typing import Any, Optional

import typer
from rich.table import Table

from dcad.cli.console import console, err_console
from dcad.cli.tracking import TRACKING_URI_OPTION

app = typer.Typer(help="Declarative pipelines: data → train or sweep → evaluate → register → gated promotion.", no_args_is_help=True)


@app.command("run")
def run(
    file: Path = typer.Argument(..., metavar="FILE", help="Pipeline file, e.g. pipelines/quickstart.yaml."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the plan (steps, resolved inputs) and run nothing."),
    resume: bool = typer.Option(False, "--resume", help="Skip the steps a previous run of this pipeline finished."),
    tracking_uri: Optional[str] = TRACKING_URI_OPTION,
    device: Optional[str] = typer.Option(None, "--device", help="Overrides the pipeline's device (auto, cpu, cuda …)."),
    as_json: bool = typer.Option(False, "--json", help="Print the steps and their outputs as JSON."),
) -> None:
    """Run the pipeline's steps in order; each step's outputs feed the next; state is kept for --resume."""
    from dcad.platform.pipeline.runner import run_pipeline

    with contextlib.redirect_stdout(sys.stderr):  # stdout carries only the result (Ray Tune prints its own tables)
        result = run_pipeline(file, resume=resume, dry_run=dry_run, tracking_uri=tracking_uri, device=device, log=_log)
    if as_json:
        console.out(json.dumps(_as_dict(result), indent=2, default=str), highlight=False)
        return
    console.print(_table(result, dry_run))
    if dry_run:
        console.print(f"dry run: nothing was executed; state file {result.state_file}")
    else:
        console.print(f"pipeline [bold]{result.spec.name}[/] finished; state in {result.state_file}")


def _log(message: str) -> None:
    err_console.print(f"[cyan]▸[/] {message}", highlight=False)


def _table(result, dry_run: bool) -> Table:
    title = f"{'Plan' if dry_run else 'Pipeline'} {result.spec.name} (work dir {result.work_dir}; tracking {_safe(result.tracking_uri)})"
    table = Table(title=title, title_justify="left")
    for column in ("#", "step", "kind", "action", "inputs" if dry_run else "outputs", "s"):
        table.add_column(column, justify="right" if column in ("#", "s") else "left", overflow="fold")
    for i, step in enumerate(result.steps, start=1):
        shown = step.inputs if dry_run or step.action == "planned" else step.outputs
        seconds = "" if step.seconds is None else f"{step.seconds:.1f}"
        table.add_row(str(i), step.name, step.kind, step.action, _pairs(shown), seconds)
    return table


def _pairs(values: dict[str, Any]) -> str:
    return "\n".join(f"{k}={_safe(str(v))}" for k, v in values.items() if v not in (None, {}, []))


def _safe(text: str) -> str:
    from dcad.platform.secrets import redact

    return redact(text)


def _as_dict(result) -> dict:
    return {
        "pipeline": result.spec.name,
        "work_dir": str(result.work_dir),
        "state_file": str(result.state_file),
        "tracking_uri": _safe(result.tracking_uri),
        "steps": [
            {"name": s.name, "kind": s.kind, "action": s.action, "inputs": s.inputs, "outputs": s.outputs, "seconds": s.seconds}
            for s in result.steps
        ],
    }
