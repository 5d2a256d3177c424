"""`train`: one in-process training, its test evaluation, and an MLflow run with the logged pyfunc model.

The model directory, `metrics.json`, `history.json` and the report are the same files `dcad train`
writes, and the run is logged with `log_model_dir`, so everything downstream (`dcad promote`,
`dcad eval runs:/…`) treats the result like any `dcad train` run.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from dcad.platform.pipeline.spec import TrainStep
from dcad.platform.pipeline.steps.context import StepContext, existing_dir


def run_train(step: TrainStep, ctx: StepContext) -> dict:
    from dcad.core.config import load_config
    from dcad.platform.tracking import TrackingOptions, log_model_dir, start_run

    data = existing_dir(step.data, step.name, "data")
    output = Path(step.output)
    cfg = load_config(profile=None if step.config else step.profile, config_path=step.config, overrides=step.overrides)
    options = TrackingOptions(ctx.tracking_uri, ctx.experiment, step.run_name or f"{ctx.pipeline}-{step.name}", tags=ctx.tags(step.name))
    tracker = start_run(options, "train")
    ctx.log(f"MLflow run {tracker.run_id} ({tracker.link or tracker.uri})")
    try:
        _train_into(cfg, data, output, ctx, tracker)
        log_model_dir(tracker, output, data)
    except BaseException:
        tracker.finish("FAILED")
        raise
    if tracker.lost is None:
        tracker.finish("FINISHED")
    if tracker.lost is not None:
        raise tracker.lost_error(output)
    return {"run_id": tracker.run_id, "model_uri": tracker.model_uri, "model_dir": str(output.resolve()), "data": str(data.resolve())}


def _train_into(cfg, data: Path, output: Path, ctx: StepContext, tracker) -> None:
    """Train, save the model directory and evaluate it on the test split (metrics.json, history.json, report/)."""
    from dcad.core.data import build_splits
    from dcad.core.metrics import AnomalyEvaluator
    from dcad.platform.figures import write_report
    from dcad.platform.tracking import REPORT_DIR
    from dcad.train.model_output import save_and_evaluate
    from dcad.train.pipeline import TrainHooks, resolve_device, train_drdc

    splits = build_splits(data, cfg.data)
    resume = ctx.resume and (output / "checkpoints").is_dir()
    if output.exists() and not resume:
        shutil.rmtree(output)
    output.mkdir(parents=True, exist_ok=True)
    device = resolve_device(ctx.device)
    hooks = TrainHooks(on_epoch=lambda report: _on_epoch(report, ctx, tracker), on_phase=ctx.log)
    ctx.log(f"profile {cfg.profile}: {len(splits.train)} train / {len(splits.val)} val / {len(splits.test)} test images on {device}")
    started = time.perf_counter()
    model, val_metrics = train_drdc(cfg, splits, device=device, checkpoint_dir=output / "checkpoints", resume=resume, hooks=hooks)
    train_s = time.perf_counter() - started
    evaluator = AnomalyEvaluator()
    result = save_and_evaluate(model, output, splits, data, train_seconds=train_s, val_metrics=val_metrics,
                               history=hooks.history, device=device, evaluator=evaluator)
    write_report(output / REPORT_DIR, result, evaluator, model, splits.index.test)
    ctx.log(f"trained in {train_s:.0f} s; test image AUROC {result['mean'].get('image_auroc', float('nan')):.3f}")


def _on_epoch(report, ctx: StepContext, tracker) -> None:
    tracker.log_epoch(report)
    shown = ", ".join(f"{k}={v:.4f}" for k, v in report.metrics.items())
    ctx.log(f"{report.stage} epoch {report.epoch}/{report.epochs}: {shown}")
