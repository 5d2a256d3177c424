"""One executor per step kind: `(resolved step spec, StepContext) -> outputs` (the keys of the step's OUTPUTS)."""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from dcad.core.json_io import write_json
from dcad.core.metrics import METRIC_KEYS
from dcad.platform.errors import RegistryError, store_errors
from dcad.platform.evaluation import evaluate_model, uri_evaluator
from dcad.platform.mlflow_store import mlflow_client, open_store
from dcad.platform.pipeline.spec import CheckStep, EvaluateStep, PipelineError, PromoteStep, RegisterStep, SweepStep, SynthStep, TrainStep


@dataclass(frozen=True)
class StepContext:
    pipeline: str
    work_dir: Path
    tracking_uri: str
    experiment: str
    device: str
    resume: bool
    log: Callable[[str], None]

    def tags(self, step: str) -> dict[str, str]:
        """MLflow tags that tie a run to the pipeline step that made it."""
        return {"dcad.pipeline": self.pipeline, "dcad.pipeline.step": step}


class StopPipeline(PipelineError):
    """A step finished but its outcome stops the pipeline (the promotion gate refused): a GateRefusedError."""

    def __init__(self, message: str, outputs: dict[str, Any]) -> None:
        super().__init__(message)
        self.outputs = outputs


def existing_dir(value: str | None, step: str, key: str) -> Path:
    """`value` as a directory that exists, else a PipelineError naming the step and key."""
    if not value:
        raise PipelineError(f"step {step}: '{key}' is empty")
    path = Path(value)
    if not path.is_dir():
        raise PipelineError(f"step {step}: {key} {path}: no such directory")
    return path


def run_synth(step: SynthStep, ctx: StepContext) -> dict:
    from dcad.core.data import open_dataset, synthesize

    out = Path(step.out)
    summary = synthesize(out, seed=step.seed, size=step.size, categories=step.categories, n_train=step.train,
                         n_test=step.test, overwrite=True)
    ctx.log(f"wrote {summary['images']} images under {out}")
    return {"data": str(out.resolve()), "digest": open_dataset(out).digest()}


def run_check(step: CheckStep, ctx: StepContext) -> dict:
    from dcad.core.data import check_dataset

    root = existing_dir(step.data, step.name, "data")
    summary = check_dataset(root, step.layout)
    totals = summary["totals"]
    ctx.log(f"{root}: {totals['categories']} categories, {totals['train']} train and "
            f"{totals['test_good'] + totals['test_anomalous']} test images, all readable")
    return {"data": str(root.resolve()), "digest": summary["digest"]}


def run_train(step: TrainStep, ctx: StepContext) -> dict:
    """One in-process training through the path `dcad train` takes (`dcad.platform.training`)."""
    from dcad.core.config import load_config
    from dcad.core.data import build_splits
    from dcad.platform.tracking import TrackingOptions, start_run
    from dcad.platform.training import ended_run, finish_training, log_training_inputs
    from dcad.core.device import resolve_device
    from dcad.train.pipeline import TrainHooks, train_drdc

    data = existing_dir(step.data, step.name, "data")
    output = Path(step.output)
    cfg = load_config(profile=None if step.config else step.profile, config_path=step.config, overrides=step.overrides)
    run_name = step.run_name or f"{ctx.pipeline}-{step.name}"
    tracker = start_run(TrackingOptions(ctx.tracking_uri, ctx.experiment, run_name, tags=ctx.tags(step.name)), "train")
    ctx.log(f"MLflow run {tracker.run_id} ({tracker.link or tracker.uri})")
    with ended_run(tracker, output):
        splits = build_splits(data, cfg.data)
        resume = ctx.resume and (output / "checkpoints").is_dir()
        if output.exists() and not resume:
            shutil.rmtree(output)
        output.mkdir(parents=True, exist_ok=True)
        device = resolve_device(ctx.device)
        digest = splits.index.digest()
        log_training_inputs(tracker, cfg, data, digest, output)

        def on_epoch(report) -> None:
            tracker.log_epoch(report)
            shown = ", ".join(f"{k}={v:.4f}" for k, v in report.metrics.items())
            ctx.log(f"{report.stage} epoch {report.epoch}/{report.epochs}: {shown}")

        hooks = TrainHooks(on_epoch=on_epoch, on_phase=ctx.log)
        ctx.log(f"profile {cfg.profile}: {len(splits.train)} train / {len(splits.val)} val / {len(splits.test)} test images on {device}")
        started = time.perf_counter()
        model, val_metrics = train_drdc(cfg, splits, device=device, checkpoint_dir=output / "checkpoints", resume=resume, hooks=hooks)
        train_s = time.perf_counter() - started
        result = finish_training(model, output, splits, data, tracker=tracker, train_seconds=train_s, val_metrics=val_metrics,
                                 history=hooks.history, device=device, dataset_digest=digest)
        ctx.log(f"trained in {train_s:.0f} s; test image AUROC {result['mean'].get('image_auroc', float('nan')):.3f}")
    return {"run_id": tracker.run_id, "model_uri": tracker.model_uri, "model_dir": str(output.resolve()), "data": str(data.resolve())}


def run_sweep(step: SweepStep, ctx: StepContext) -> dict:
    """A Ray Tune + Optuna sweep (`dcad.platform.sweep`); its best trial's run feeds register and promote."""
    import ray

    from dcad.platform.sweep import load_sweep_spec, run_sweep as sweep
    from dcad.platform.sweep.spec import parse_sweep_spec

    spec = load_sweep_spec(Path(step.spec))
    changes = {**step.set, **({"dataset": step.data} if step.data else {})}
    if changes:  # checked again like a spec file; its source anchors relative paths
        spec = parse_sweep_spec({**spec.model_dump(mode="json", exclude_none=True), **changes}, spec.source or step.spec)
    try:
        result = sweep(spec, resume=ctx.resume, address=step.address, tracking_uri=ctx.tracking_uri, log=ctx.log)
    finally:
        if ray.is_initialized():  # a driver still attached when the cluster goes away is killed by Ray
            ray.shutdown()
    run_id = result.best_trial.run_id if result.best_trial is not None else None
    if not run_id:
        raise PipelineError(f"step {step.name}: the sweep {spec.name} finished without a best trial with an MLflow run")
    ctx.log(f"best trial: run {run_id} (sweep run {result.parent_run_id})")
    version = result.registered_version
    return {"run_id": run_id, "parent_run_id": result.parent_run_id,
            "model_uri": mlflow_client(ctx.tracking_uri).get_run(run_id).data.tags.get("dcad.model_uri"),
            "registered_version": None if version is None else str(version), "data": str(Path(spec.dataset).resolve())}


def run_evaluate(step: EvaluateStep, ctx: StepContext) -> dict:
    data = existing_dir(step.data, step.name, "data")
    if not step.model:
        raise PipelineError(f"step {step.name}: 'model' is empty")
    result = evaluate_model(step.model, data, ctx.device, tracking_uri=ctx.tracking_uri).result
    metrics_file = ctx.work_dir / f"{step.name}.json"
    write_json(metrics_file, {**result, "model": step.model, "data": str(data)})
    mean = result["mean"]
    ctx.log("mean " + ", ".join(f"{k}={mean[k]:.3f}" for k in METRIC_KEYS if k in mean))
    for metric, minimum in step.require.items():
        value = mean.get(metric)
        if value is None or not value >= minimum:
            shown = value if value is None else f"{value:.4f}"
            raise PipelineError(f"step {step.name}: {metric} = {shown} is below the required {minimum:g}")
    return {"metrics_file": str(metrics_file), **{k: mean.get(k) for k in METRIC_KEYS}}


def run_register(step: RegisterStep, ctx: StepContext) -> dict:
    from dcad.platform import registry

    _, client = open_store(ctx.tracking_uri)
    with store_errors(f"registering run {step.run_id} as {step.model_name} failed", RegistryError):
        registry.validate_name(client, step.model_name)
        run = registry.source_run(client, step.run_id or "")
        version = str(registry.version_for(client, step.model_name, run, registry.run_model_id(run), ctx.tags(step.name)).version)
    ctx.log(f"{step.model_name} version {version} ← run {run.info.run_id}")
    return {"model_name": step.model_name, "version": version, "run_id": run.info.run_id}


def run_promote(step: PromoteStep, ctx: StepContext) -> dict:
    from dcad.platform import registry

    uri, client = open_store(ctx.tracking_uri)
    request = registry.PromotionRequest(step.model_name, step.run_id or "", step.alias, Path(step.data) if step.data else None,
                                        step.tolerance, tuple(step.gate_metrics), step.force, floor=step.floor)
    evaluate = uri_evaluator(uri, ctx.device, on_start=lambda model: ctx.log(f"gate: evaluating {model}"))
    with store_errors(f"promotion of run {step.run_id} to {step.model_name}@{step.alias} failed", RegistryError):
        result = registry.promote(client, request, evaluate)
    outputs = {"model_name": result.name, "version": result.version, "decision": result.decision, "moved": result.moved}
    for note in result.notes:
        ctx.log(f"note: {note}")
    ctx.log(f"gate {result.decision}: {result.name}@{result.alias} → version {result.version if result.moved else result.previous}")
    if not result.moved and step.on_refusal == "fail":
        raise StopPipeline(f"step {step.name}: the gate refused version {result.version} ({result.refusal()})", outputs)
    return outputs


EXECUTORS: dict[str, Callable] = {"synth": run_synth, "check": run_check, "train": run_train, "sweep": run_sweep,
                                  "evaluate": run_evaluate, "register": run_register, "promote": run_promote}
