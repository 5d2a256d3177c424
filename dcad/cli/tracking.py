"""Tracking options and the MLflow run of one command (`dcad train`, `dcad eval --log`, `dcad log`)."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

import typer

from dcad.cli.console import err_console
from dcad.platform.mlflow_store import DEFAULT_EXPERIMENT
from dcad.platform.training import ended_run

EXPERIMENT_OPTION = typer.Option(DEFAULT_EXPERIMENT, "--experiment", "-e", help="MLflow experiment name.")
RUN_NAME_OPTION = typer.Option(None, "--run-name", help="MLflow run name (default: generated).")
TRACKING_URI_OPTION = typer.Option(
    None, "--tracking-uri", envvar="MLFLOW_TRACKING_URI", help="MLflow tracking URI (default: sqlite store under ./.dcad/)."
)
NO_TRACK_OPTION = typer.Option(False, "--no-track", help="Do not log to MLflow.")


@contextmanager
def command_run(enabled: bool, tracking_uri: Optional[str], experiment: str, run_name: Optional[str], kind: str,
                model_dir: Optional[Path] = None, run_id: Optional[str] = None) -> Iterator:
    """The command's MLflow run (a RunTracker, None with tracking off), opened (or, with `run_id`, continued)
    before any work starts and ended with the block (`dcad.platform.training.ended_run`)."""
    if not enabled:
        yield None
        return
    from dcad.platform.tracking import TrackingOptions, start_run

    tracker = start_run(TrackingOptions(tracking_uri, experiment, run_name), kind, run_id=run_id)
    if run_id:
        err_console.print(f"[cyan]▸[/] continuing MLflow run {run_id} (recorded in the run's checkpoint)")
    else:
        where = tracker.link or tracker.uri
        err_console.print(f"[cyan]▸[/] MLflow run {tracker.run_id} in experiment '{experiment}' ({where})")
    with ended_run(tracker, model_dir):
        yield tracker
    link = tracker.link
    err_console.print(f"logged to MLflow run {tracker.run_id}" + (f": {link}" if link else f" ({tracker.uri})"))


def end_orphaned_training_runs(tracking_uri: Optional[str], experiment: str, output: Path) -> None:
    """`dcad train --resume`: runs of this model directory left RUNNING by a process that died end FAILED."""
    from dcad.platform.mlflow_store import open_store
    from dcad.platform.tracking import end_orphaned_runs

    uri, client = open_store(tracking_uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return
    model_dir = str(output.resolve()).replace("'", "\\'")
    ended = end_orphaned_runs(client, found.experiment_id, f"tags.`dcad.model_dir` = '{model_dir}'",
                              "its process died before it ended the run; found by dcad train --resume")
    for run_id in ended:
        err_console.print(f"[yellow]▸[/] MLflow run {run_id} of {output} was left RUNNING by a process that died: marked FAILED")
