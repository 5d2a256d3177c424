"""`dcad train`, `dcad eval`, `dcad predict`."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import typer

from dcad.cli import train_ray
from dcad.cli.console import console, err_console
from dcad.cli.tracking import (
    EXPERIMENT_OPTION,
    NO_TRACK_OPTION,
    RUN_NAME_OPTION,
    TRACKING_URI_OPTION,
    CommandTracking,
    end_orphaned_training_runs,
    tracked,
)
from dcad.core.config import PROFILES, ConfigError, load_config

MODEL_HELP = "A model directory (or, with MLflow, runs:/RUN_ID/model or models:/NAME@ALIAS)."


def _load_cfg(profile: str, config: Optional[Path], overrides: list[str]):
    if profile not in PROFILES and config is None:
        raise ConfigError(f"unknown profile '{profile}' (choose from {', '.join(PROFILES)})")
    return load_config(profile=profile if config is None else None, config_path=config, overrides=overrides)


def resolve_model_dir(model: str, tracking_uri: Optional[str] = None) -> Path:
    if model.startswith(("runs:/", "models:/")):
        from dcad.platform.model_uri import download_model_dir

        return download_model_dir(model, tracking_uri)
    return Path(model)


def _hooks(progress):
    from dcad.train.pipeline import TrainHooks

    tasks: dict[str, int] = {}

    def on_phase(name: str) -> None:
        err_console.print(f"[cyan]▸[/] {name}")

    def on_step(epoch: int, step: int, loss: float) -> None:
        pass

    def on_epoch(report) -> None:
        key = report.stage
        if key not in tasks:
            tasks[key] = progress.add_task(f"{key} epochs", total=report.epochs)
        progress.update(tasks[key], completed=report.epoch)
        shown = ", ".join(f"{k}={v:.4f}" for k, v in report.metrics.items())
        progress.console.print(f"  {report.stage} epoch {report.epoch}/{report.epochs}: {shown}")

    return TrainHooks(on_epoch=on_epoch, on_step=on_step, on_phase=on_phase)


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
    workers: Optional[int] = train_ray.WORKERS_OPTION,
    cpus_per_worker: float = train_ray.CPUS_OPTION,
    gpus_per_worker: float = train_ray.GPUS_OPTION,
    address: Optional[str] = train_ray.ADDRESS_OPTION,
    storage: Optional[str] = train_ray.STORAGE_OPTION,
    name: Optional[str] = train_ray.NAME_OPTION,
    max_failures: int = train_ray.MAX_FAILURES_OPTION,
) -> None:
    """Train one multi-class DRDC model, evaluate it once on the test split, write the model directory."""
    ray_plan = None  # checked first: a wrong --address/--storage fails before torch is even imported
    if workers:
        ray_plan = train_ray.plan(workers, cpus_per_worker, gpus_per_worker, address, storage, name, max_failures, output, resume)
    from dcad.cli.common import check_output_dir, metrics_table, prepare_output_dir, progress_bar, write_json
    from dcad.core.data import build_splits
    from dcad.train.model_output import save_and_evaluate
    from dcad.train.pipeline import resolve_device, train_drdc

    # Every argument is checked before the MLflow run opens: a mistake leaves no empty FAILED run behind.
    if not no_track:
        from dcad.platform.store import open_store

        open_store(tracking_uri)  # an unreachable server fails first, before anything is read or written
    cfg = _load_cfg(profile, config, overrides)
    splits = build_splits(data, cfg.data)
    keep = resume or (ray_plan is not None and ray_plan.previous is not None)
    check_output_dir(output, overwrite, keep)
    dev = resolve_device(device)
    if keep and not no_track:
        end_orphaned_training_runs(tracking_uri, experiment, output)
    tracking = train_ray.begin_tracking(not no_track, tracking_uri, experiment, run_name, ray_plan)
    prepare_output_dir(output, overwrite, keep)
    err_console.print(
        f"dcad train: profile [bold]{cfg.profile}[/], {len(splits.categories)} categories, "
        f"{len(splits.train)} train / {len(splits.val)} val / {len(splits.test)} test images, device {dev}"
    )
    if ray_plan is None or ray_plan.previous is None:
        tracking.log_training_inputs(cfg, splits.index, data, output)
    start = time.perf_counter()
    if ray_plan is not None:
        model, val_metrics, history = train_ray.train(cfg, data, ray_plan, tracking, dev)
    else:
        with progress_bar() as progress:
            hooks = _hooks(progress)
            hooks.on_epoch = tracking.wrap_epoch(hooks.on_epoch)
            model, val_metrics = train_drdc(cfg, splits, device=dev, checkpoint_dir=output / "checkpoints", resume=resume, hooks=hooks)
        history = hooks.history
    train_s = time.perf_counter() - start
    err_console.print(f"[cyan]▸[/] test evaluation ({len(splits.test)} images)")
    evaluator = tracking.evaluator()
    result = save_and_evaluate(model, output, splits, data, train_seconds=train_s, val_metrics=val_metrics,
                               history=history, device=dev, evaluator=evaluator)
    eval_s = result["timing"]["eval_seconds"]
    if json_out:
        write_json(json_out, result)
    console.print(metrics_table(result, title=f"Test metrics ({output})"))
    err_console.print(f"trained in {train_s:.0f} s, evaluated in {eval_s:.1f} s; model written to [bold]{output}[/]")
    tracking.finish_training(output, result, evaluator, model, splits.index.test)


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
    from dcad.core.inference import evaluate, open_test_set
    from dcad.core.model.drdc import with_inference_overrides
    from dcad.core.model.model_dir import load_model
    from dcad.train.pipeline import resolve_device

    tracking = CommandTracking.begin(log, tracking_uri, experiment, run_name, "eval")
    dev = resolve_device(device)
    net = with_inference_overrides(load_model(resolve_model_dir(model, tracking_uri), dev), overrides)
    index, skipped, test = open_test_set(data, net)
    if skipped:
        err_console.print(f"note: evaluating the model's {len(index.categories)} categories; {data} also holds "
                          f"{', '.join(skipped)}, which it was not trained on", highlight=False)
    with progress_bar() as progress:
        task = progress.add_task("evaluating", total=len(test))
        result = evaluate(
            net,
            test,
            batch_size or net.cfg.train.eval_batch_size,
            dev,
            track_defect_types=by_defect,
            on_batch=lambda done, total: progress.update(task, completed=done),
            evaluator=tracking.evaluator(track_defect_types=by_defect),
        )
    result["model"] = str(model)
    result["dataset_digest"] = index.digest()
    if json_out:
        write_json(json_out, result)
    console.print(metrics_table(result, title=f"Test metrics ({model} on {data})"))
    if by_defect:
        console.print(defect_table(result))
    tracking.finish_evaluation(model, data, index, result, net)


def register(app: typer.Typer) -> None:
    app.command("train")(tracked(train))
    app.command("eval")(tracked(eval_cmd))
