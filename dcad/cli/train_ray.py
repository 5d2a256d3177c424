"""The `--workers …` options of `dcad train` and their glue: plan the Ray run, continue its MLflow run, train."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from dcad.cli.console import err_console
from dcad.core.errors import DcadError

PANEL = "Distributed training (Ray Train)"
WORKERS_OPTION = typer.Option(
    None, "--workers", min=1, help="Train on N Ray Train workers (DDP) instead of in this process.", rich_help_panel=PANEL
)
CPUS_OPTION = typer.Option(1.0, "--cpus-per-worker", help="CPUs reserved per worker (fractions allowed).", rich_help_panel=PANEL)
GPUS_OPTION = typer.Option(0.0, "--gpus-per-worker", help="GPUs per worker (NCCL when > 0, gloo otherwise).", rich_help_panel=PANEL)
ADDRESS_OPTION = typer.Option(
    None, "--address", help="Ray cluster: HOST:PORT, ray://HOST:PORT or auto (default: start a local Ray).", rich_help_panel=PANEL
)
STORAGE_OPTION = typer.Option(
    None,
    "--storage",
    help="Checkpoint storage: a directory shared by the nodes or s3://bucket/prefix[?endpoint_override=URL] "
    "(default: OUTPUT/checkpoints).",
    rich_help_panel=PANEL,
)
NAME_OPTION = typer.Option(
    None, "--name", help="Ray run name; running again with the same name continues from its last checkpoint.", rich_help_panel=PANEL
)
MAX_FAILURES_OPTION = typer.Option(
    2, "--max-failures", min=0, help="Worker or node failures to recover from (from the last checkpoint).", rich_help_panel=PANEL
)


def plan(
    workers: int,
    cpus_per_worker: float,
    gpus_per_worker: float,
    address: Optional[str],
    storage: Optional[str],
    name: Optional[str],
    max_failures: int,
    output: Path,
    resume: bool,
):
    """The Ray run to start or continue (checks the options; writes nothing)."""
    from dcad.platform.ray_train import RayTrainOptions, plan_run

    if resume and not name:
        raise DcadError("--resume with --workers needs --name NAME (the Ray run to continue)")
    options = RayTrainOptions(workers, cpus_per_worker, gpus_per_worker, address, storage, name, max_failures)
    return plan_run(options, output)


def begin_tracking(enabled: bool, tracking_uri: Optional[str], experiment: str, run_name: Optional[str], ray_plan):
    """The command's MLflow run; the run recorded in the Ray checkpoint when this continues a run."""
    from dcad.cli.tracking import CommandTracking

    run_id = ray_plan.previous_mlflow_run_id if ray_plan is not None else None
    if not enabled or run_id is None:
        return CommandTracking.begin(enabled, tracking_uri, experiment, run_name, "train")
    from dcad.platform.tracking import TrackingOptions, start_run

    tracker = start_run(TrackingOptions(tracking_uri, experiment, run_name), "train", run_id=run_id)
    err_console.print(f"[cyan]▸[/] continuing MLflow run {run_id} (recorded in the run's checkpoint)")
    return CommandTracking(tracker)


def train(cfg, data: Path, ray_plan, tracking, device):
    """Train on Ray; returns (model on `device`, validation metrics, per-epoch history)."""
    from dcad.platform.ray_train import train_on_ray

    tracker = tracking.tracker if tracking.enabled else None
    outcome = train_on_ray(
        cfg,
        data,
        ray_plan,
        tracking_uri=tracker.uri if tracker else None,
        mlflow_run_id=tracker.run_id if tracker else None,
        log=lambda message: err_console.print(f"[cyan]▸[/] {message}", highlight=False),
    )
    err_console.print(f"[cyan]▸[/] Ray training finished in {outcome.fit_seconds:.0f} s")
    return outcome.model.to(device), outcome.val_metrics, outcome.history
