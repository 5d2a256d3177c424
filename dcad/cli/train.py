"""`dcad train` and `dcad eval`."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Optional

import typer

from dcad.cli.console import console, err_console
from dcad.cli.tracking import (EXPERIMENT_OPTION, NO_TRACK_OPTION, RUN_NAME_OPTION, TRACKING_URI_OPTION, command_run,
                               end_orphaned_training_runs)
from dcad.core.config import PROFILES, ConfigError, load_config
from dcad.core.errors import DcadError

MODEL_HELP = "A model directory (or, with MLflow, runs:/RUN_ID/model or models:/NAME@ALIAS)."
PANEL = "Distributed training (Ray Train)"
WORKERS_OPTION = typer.Option(None, "--workers", min=1, rich_help_panel=PANEL,
                              help="Train on N Ray Train workers (DDP) instead of in this process.")
CPUS_OPTION = typer.Option(1.0, "--cpus-per-worker", help="CPUs reserved per worker (fractions allowed).", rich_help_panel=PANEL)
GPUS_OPTION = typer.Option(0.0, "--gpus-per-worker", min=0.0, rich_help_panel=PANEL,
                           help="GPUs per worker (NCCL when > 0, gloo otherwise).")
ADDRESS_OPTION = typer.Option(None, "--address", rich_help_panel=PANEL,
                              help="Ray cluster: HOST:PORT, ray://HOST:PORT or auto (default: start a local Ray).")
STORAGE_OPTION = typer.Option(None, "--storage", rich_help_panel=PANEL,
                              help="Checkpoint storage: a directory shared by the nodes or "
                                   "s3://bucket/prefix[?endpoint_override=URL] (default: OUTPUT/checkpoints).")
NAME_OPTION = typer.Option(None, "--name", rich_help_panel=PANEL,
                           help="Ray run name; running again with the same name continues from its last checkpoint.")
MAX_FAILURES_OPTION = typer.Option(2, "--max-failures", min=0, rich_help_panel=PANEL,
                                   help="Worker or node failures to recover from (from the last checkpoint).")


def _load_cfg(profile: str, config: Optional[Path], overrides: list[str]):
    if profile not in PROFILES and config is None:
        raise ConfigError(f"unknown profile '{profile}' (choose from {', '.join(PROFILES)})")
    return load_config(profile=profile if config is None else None, config_path=config, overrides=overrides)


def _hooks(progress, tracker):
    from dcad.train.pipeline import TrainHooks

    tasks: dict[str, int] = {}

    def on_epoch(report) -> None:
        if report.stage not in tasks:
            tasks[report.stage] = progress.add_task(f"{report.stage} epochs", total=report.epochs)
        progress.update(tasks[report.stage], completed=report.epoch)
        shown = ", ".join(f"{k}={v:.4f}" for k, v in report.metrics.items())
        progress.console.print(f"  {report.stage} epoch {report.epoch}/{report.epochs}: {shown}")
        if tracker is not None:
            tracker.log_epoch(report)

    return TrainHooks(on_epoch=on_epoch, on_phase=lambda name: err_console.print(f"[cyan]▸[/] {name}"))


def train(
    data: Path = typer.Option(..., "--data", help="Dataset root (MVTec AD, VisA, BTAD or folder layout)."),
    output: Path = typer.Option(..., "--output", "-o", help="Model directory to write."),
    profile: str = typer.Option("cpu", "--profile", "-p", help=f"Shipped profile: {', '.join(PROFILES)}."),
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="A config YAML (replaces --profile)."),
    overrides: list[str] = typer.Option([], "--set", help="Dotted override, e.g. --set train.base.epochs=5."),
    device: str = typer.Option("auto", help="auto, cpu, cuda, cuda:1 …"),
    overwrite: bool = typer.Option(False, help="Replace a non-empty output directory."),
    resume: bool = typer.Option(False, help="Continue from the checkpoints in --output."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Also write the test metrics here."),
    experiment: str = EXPERIMENT_OPTION,
    run_name: Optional[str] = RUN_NAME_OPTION,
    tracking_uri: Optional[str] = TRACKING_URI_OPTION,
    no_track: bool = NO_TRACK_OPTION,
    workers: Optional[int] = WORKERS_OPTION,
    cpus_per_worker: float = CPUS_OPTION,
    gpus_per_worker: float = GPUS_OPTION,
    address: Optional[str] = ADDRESS_OPTION,
    storage: Optional[str] = STORAGE_OPTION,
    name: Optional[str] = NAME_OPTION,
    max_failures: int = MAX_FAILURES_OPTION,
) -> None:
    """Train one multi-class DRDC model, evaluate it once on the test split, write the model directory."""
    ray_plan = None  # checked first: a wrong --address/--storage fails before torch is even imported
    if workers:
        from dcad.platform.ray_train import RayTrainOptions, plan_run, train_on_ray

        if resume and not name:
            raise DcadError("--resume with --workers needs --name NAME (the Ray run to continue)")
        ray_plan = plan_run(RayTrainOptions(workers, cpus_per_worker, gpus_per_worker, address, storage, name, max_failures), output)
    from dcad.cli.common import check_output_dir, metrics_table, prepare_output_dir, progress_bar, write_json
    from dcad.core.data import build_splits
    from dcad.core.device import resolve_device
    from dcad.platform.training import finish_training, log_training_inputs
    from dcad.train.pipeline import train_drdc

    # Every argument is checked before the MLflow run opens: a mistake leaves no empty FAILED run behind.
    if not no_track:
        from dcad.platform.mlflow_store import open_store

        open_store(tracking_uri)  # an unreachable server fails first, before anything is read or written
    cfg = _load_cfg(profile, config, overrides)
    splits = build_splits(data, cfg.data)
    continued = ray_plan is not None and ray_plan.previous is not None
    check_output_dir(output, overwrite, resume or continued)
    dev = resolve_device(device)
    if (resume or continued) and not no_track:
        end_orphaned_training_runs(tracking_uri, experiment, output)
    run_id = ray_plan.previous_mlflow_run_id if continued else None
    with command_run(not no_track, tracking_uri, experiment, run_name, "train", output, run_id) as tracker:
        prepare_output_dir(output, overwrite, resume or continued)
        err_console.print(
            f"dcad train: profile [bold]{cfg.profile}[/], {len(splits.categories)} categories, "
            f"{len(splits.train)} train / {len(splits.val)} val / {len(splits.test)} test images, device {dev}"
        )
        digest = splits.index.digest()
        if tracker is not None and not continued:
            log_training_inputs(tracker, cfg, data, digest, output)
        start = time.perf_counter()
        if ray_plan is not None:
            ray_run = train_on_ray(cfg, data, ray_plan, tracking_uri=tracker.uri if tracker else None,
                                   mlflow_run_id=tracker.run_id if tracker else None,
                                   log=lambda message: err_console.print(f"[cyan]▸[/] {message}", highlight=False))
            err_console.print(f"[cyan]▸[/] Ray training finished in {ray_run.fit_seconds:.0f} s")
            model, val_metrics, history = ray_run.model.to(dev), ray_run.val_metrics, ray_run.history
        else:
            with progress_bar() as progress:
                hooks = _hooks(progress, tracker)
                model, val_metrics = train_drdc(cfg, splits, device=dev, checkpoint_dir=output / "checkpoints", resume=resume, hooks=hooks)
            history = hooks.history
        train_s = time.perf_counter() - start
        err_console.print(f"[cyan]▸[/] test evaluation, report{' and MLflow logging' if tracker else ''} ({len(splits.test)} images)")
        result = finish_training(model, output, splits, data, tracker=tracker, train_seconds=train_s, val_metrics=val_metrics,
                                 history=history, device=dev, dataset_digest=digest)
        if json_out:
            write_json(json_out, result)
        console.print(metrics_table(result, title=f"Test metrics ({output})"))
        eval_s = result["timing"]["eval_seconds"]
        err_console.print(f"trained in {train_s:.0f} s, evaluated in {eval_s:.1f} s; model written to [bold]{output}[/]")


def eval_cmd(
    model: str = typer.Argument(..., help=MODEL_HELP),
    data: Path = typer.Option(..., "--data", help="Dataset root; its test split is evaluated."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write the metrics JSON here."),
    device: str = typer.Option("auto"),
    batch_size: Optional[int] = typer.Option(None, help="Defaults to the model's eval batch size."),
    by_defect: bool = typer.Option(False, "--by-defect", help="Also report metrics per defect type."),
    overrides: Optional[list[str]] = typer.Option(
        None, "--set", help="Inference-only override, e.g. --set ablation.mode=base_only or --set fusion.mode=sum."
    ),
    tracking_uri: Optional[str] = typer.Option(None, envvar="MLFLOW_TRACKING_URI", help="MLflow tracking URI."),
    log: bool = typer.Option(False, "--log", help="Log this evaluation as an MLflow run (metrics, plots, dataset)."),
    experiment: str = EXPERIMENT_OPTION,
    run_name: Optional[str] = RUN_NAME_OPTION,
) -> None:
    """Evaluate a model on a dataset's test split: per-category and mean metrics."""
    from dcad.cli.common import defect_table, metrics_table, progress_bar, write_json
    from dcad.core.metrics import AnomalyEvaluator
    from dcad.platform.evaluation import evaluate_model

    with command_run(log, tracking_uri, experiment, run_name, "eval") as tracker:
        evaluator = AnomalyEvaluator(track_defect_types=by_defect)
        with progress_bar() as progress:
            task = progress.add_task("evaluating", total=None)
            done = evaluate_model(model, data, device, tracking_uri=tracking_uri, overrides=overrides, batch_size=batch_size,
                                  evaluator=evaluator, on_batch=lambda n, total: progress.update(task, completed=n, total=total))
        if done.skipped:
            err_console.print(f"note: evaluating the model's {len(done.index.categories)} categories; {data} also holds "
                              f"{', '.join(done.skipped)}, which it was not trained on", highlight=False)
        result = {**done.result, "model": str(model), "dataset_digest": done.index.digest()}
        if json_out:
            write_json(json_out, result)
        console.print(metrics_table(result, title=f"Test metrics ({model} on {data})"))
        if by_defect:
            console.print(defect_table(result))
        if tracker is not None:
            _log_evaluation(tracker, model, data, done, result, evaluator)


def _log_evaluation(tracker, model: str, data: Path, done, result: dict, evaluator) -> None:
    from dcad.platform.tracking import REPORT_DIR
    from dcad.train.report import write_report

    tracker.log_params({"model": model, "data": str(data)})
    tracker.set_tags({"dcad.model_source": model})
    tracker.log_dataset(data.resolve(), result["dataset_digest"], "evaluation")
    tracker.log_evaluation(result, "test")
    with tempfile.TemporaryDirectory(prefix="dcad-report-") as tmp:
        write_report(Path(tmp), result, evaluator, done.model, done.index.test)
        tracker.log_artifacts(Path(tmp), REPORT_DIR)


def register(app: typer.Typer) -> None:
    app.command("train")(train)
    app.command("eval")(eval_cmd)
