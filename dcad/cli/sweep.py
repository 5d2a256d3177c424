"""`dcad sweep SPEC [--resume] [--dry-run] [--address ADDR] [--tracking-uri URI] [--storage PATH] [--json FILE]`."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from dcad.cli.console import console, err_console

INTERRUPTED_EXIT = 130


def sweep(
    spec_path: Path = typer.Argument(..., metavar="SPEC", help="Sweep spec YAML (see sweeps/)."),
    resume: bool = typer.Option(False, "--resume", help="Continue the interrupted sweep of this name and storage."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the trial plan and resources; start nothing."),
    address: Optional[str] = typer.Option(None, "--address", help="Ray cluster: HOST:PORT, ray://HOST:PORT or auto (default: local Ray)."),
    tracking_uri: Optional[str] = typer.Option(
        None, "--tracking-uri", help="MLflow tracking URI of a new sweep (default: MLFLOW_TRACKING_URI, else the "
        "spec's, else the sqlite store under ./.dcad/); a resumed sweep keeps the store it was started with."),
    storage: Optional[str] = typer.Option(None, "--storage", help="Where the sweep lives (a directory or s3://…; default: the spec's storage)."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write the sweep result (trials, best trial) as JSON here."),
) -> None:
    """Search a DRDC config with Ray Tune + Optuna: trials share the stages they agree on, each a nested MLflow run."""
    from dcad.platform.sweep import load_sweep_spec, plan_sweep, run_sweep

    spec = load_sweep_spec(spec_path)
    if dry_run:
        plan = plan_sweep(spec, resume=resume, address=address, tracking_uri=tracking_uri, storage=storage)
        for line in plan.lines():
            console.print(line, highlight=False, markup=False)
        return
    result = run_sweep(spec, resume=resume, address=address, tracking_uri=tracking_uri, storage=storage, log=_say)
    for table in trials_tables(result):
        console.print(table)
    if result.best_trial is not None:
        b = result.best_trial
        shown = ", ".join(f"{k}={v:.4f}" for k, v in b.objectives.items())
        console.print(f"best trial {b.trial_id} (MLflow run {b.run_id}): {shown}", highlight=False, markup=False)
    console.print(f"MLflow parent run: {result.parent_run_id}; leaderboard: dcad leaderboard --parent {spec.name}"
                  + (" --pareto" if spec.multi_objective else ""), highlight=False, markup=False)
    if json_out:
        from dcad.cli.common import write_json

        write_json(json_out, asdict(result))
    if result.interrupted:
        raise typer.Exit(INTERRUPTED_EXIT)


def _say(message: str) -> None:
    from rich.markup import escape

    err_console.print(f"[cyan]▸[/] {escape(message)}", highlight=False, soft_wrap=True)


def trials_tables(result) -> list[Table]:
    """The trials (status, objectives, test metrics for the record), then their params: each fits 80 columns."""
    from dcad.cli.common import compact_table, metric_column, params_table
    from dcad.cli.leaderboard import metric_header

    objectives = list(dict.fromkeys(k for t in result.trials for k in t.objectives))  # in the spec's order
    table = compact_table(f"Sweep {result.name}: {len(result.trials)} trial(s) in {result.wall_seconds:.0f} s "
                          "(★ best, ◆ Pareto front)")
    table.add_column("trial", no_wrap=True)
    table.add_column("status")
    for column in (*objectives, "test_image_auroc", "test_pixel_auroc"):
        metric_column(table, ("test " if column.startswith("test_") else "") + metric_header(column))
    best = result.best_trial.trial_id if result.best_trial else None
    for t in result.trials:
        mark = " ★" if t.trial_id == best else (" ◆" if t.trial_id in result.pareto else "")
        cells = [_fmt(t.objectives.get(k)) for k in objectives]
        cells += [_fmt(t.metrics.get(k)) if t.status == "finished" else "—" for k in ("test_image_auroc", "test_pixel_auroc")]
        table.add_row(t.trial_id + mark, t.status, *cells)
    keys = sorted({k for t in result.trials for k in t.params})
    rows = [(t.trial_id, {k: _fmt(v) for k, v in t.params.items()}) for t in result.trials]
    params = params_table("Trial params", rows, keys, label="trial")
    return [table] + ([params] if params is not None else [])


def _fmt(value) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.3f}" if 0 < abs(value) < 1 else f"{value:.4g}"
    return json.dumps(value) if isinstance(value, list) else str(value)


def register(app: typer.Typer) -> None:
    app.command("sweep")(sweep)
