"""`dcad log MODEL_DIR`: log a locally written model directory to MLflow (e.g. after the server was lost)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from dcad.cli.console import console, err_console
from dcad.cli.tracking import EXPERIMENT_OPTION, RUN_NAME_OPTION, TRACKING_URI_OPTION


def log(
    model_dir: Path = typer.Argument(..., help="Model directory written by dcad train."),
    run_id: Optional[str] = typer.Option(None, "--run-id", help="Complete this existing run instead of creating one."),
    experiment: str = EXPERIMENT_OPTION,
    run_name: Optional[str] = RUN_NAME_OPTION,
    data: Optional[Path] = typer.Option(None, "--data", help="Dataset to record as the run's input (default: the one in the model)."),
    tracking_uri: Optional[str] = TRACKING_URI_OPTION,
) -> None:
    """Log params, per-epoch and test metrics, report, config and the pyfunc model of MODEL_DIR."""
    from dcad.core.model.model_dir import read_metadata
    from dcad.platform.errors import TrackingError
    from dcad.platform.tracking import TrackingOptions, log_model_dir, start_run

    read_metadata(model_dir)  # a clear error before anything is created
    if data is not None and not data.is_dir():
        raise TrackingError(f"--data {data}: no such directory")
    tracker = start_run(TrackingOptions(tracking_uri, experiment, run_name), "train", run_id=run_id)
    log_model_dir(tracker, model_dir, data)
    if tracker.lost is None:
        tracker.finish("FINISHED")
    if tracker.lost is not None:
        raise TrackingError(f"logging {model_dir} to run {tracker.run_id} failed ({tracker.lost}); run the command again")
    console.print(f"logged {model_dir} to run {tracker.run_id}; model {tracker.model_uri}")
    if tracker.link:
        err_console.print(tracker.link)


def register(app: typer.Typer) -> None:
    app.command("log")(log)
