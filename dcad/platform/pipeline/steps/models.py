"""`evaluate`, `register` and `promote`: what happens to a trained run's model."""

from __future__ import annotations

from pathlib import Path

from dcad.core.metrics import METRIC_KEYS
from dcad.platform.pipeline.errors import PipelineError
from dcad.platform.pipeline.spec import EvaluateStep, PromoteStep, RegisterStep
from dcad.platform.pipeline.steps.context import StepContext, StopPipeline, existing_dir, write_json

MODEL_URI_PREFIXES = ("runs:/", "models:/")


def run_evaluate(step: EvaluateStep, ctx: StepContext) -> dict:
    from dcad.platform.evaluation import evaluate_model_dir
    from dcad.platform.model_uri import download_model_dir

    data = existing_dir(step.data, step.name, "data")
    if not step.model:
        raise PipelineError(f"step {step.name}: 'model' is empty")
    model_dir = download_model_dir(step.model, ctx.tracking_uri) if step.model.startswith(MODEL_URI_PREFIXES) else Path(step.model)
    result = evaluate_model_dir(model_dir, data, ctx.device)
    metrics_file = ctx.work_dir / f"{step.name}.json"
    write_json(metrics_file, {**result, "model": step.model, "data": str(data)})
    mean = result["mean"]
    ctx.log("mean " + ", ".join(f"{k}={mean[k]:.3f}" for k in METRIC_KEYS if k in mean))
    outputs = {"metrics_file": str(metrics_file), **{k: mean.get(k) for k in METRIC_KEYS}}
    _check_minimums(step, mean)
    return outputs


def _check_minimums(step: EvaluateStep, mean: dict) -> None:
    for metric, minimum in step.require.items():
        value = mean.get(metric)
        if value is None or not value >= minimum:
            raise PipelineError(f"step {step.name}: {metric} = {value if value is None else f'{value:.4f}'} is below the required {minimum:g}")


def run_register(step: RegisterStep, ctx: StepContext) -> dict:
    from dcad.platform import registry
    from dcad.platform.errors import RegistryError, store_errors
    from dcad.platform.store import open_store

    _, client = open_store(ctx.tracking_uri)
    with store_errors(f"registering run {step.run_id} as {step.model_name} failed", RegistryError):
        exists = registry.validate_name(client, step.model_name)
        run = registry.source_run(client, step.run_id or "")
        model_id = registry.run_model_id(run)
        if not exists:
            client.create_registered_model(step.model_name, tags={"dcad.created_by": registry.who()})
        version = _version_of(client, step.model_name, run, model_id, ctx.tags(step.name))
    ctx.log(f"{step.model_name} version {version} ← run {run.info.run_id}")
    return {"model_name": step.model_name, "version": str(version), "run_id": run.info.run_id}


def _version_of(client, name: str, run, model_id: str, pipeline_tags: dict[str, str]) -> str:
    """The version already registered for this logged model, else a new one (the same rule `dcad promote` uses)."""
    from dcad.platform import registry
    from dcad.platform.store import use_store

    for version in client.search_model_versions(f"name='{name}'"):
        if registry.version_model_id(version) == model_id:
            return str(version.version)
    tags = {"dcad.registered_by": registry.who(), "dcad.registered_at": registry.now_utc(), "dcad.source_run": run.info.run_id,
            **pipeline_tags}
    with use_store(client.tracking_uri):  # the registry resolves models:/ sources through the global URI
        created = client.create_model_version(name, source=f"models:/{model_id}", run_id=run.info.run_id, model_id=model_id, tags=tags)
    return str(created.version)


def run_promote(step: PromoteStep, ctx: StepContext) -> dict:
    from dcad.platform import registry
    from dcad.platform.errors import RegistryError, store_errors
    from dcad.platform.evaluation import uri_evaluator
    from dcad.platform.store import open_store

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
