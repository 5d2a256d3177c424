"""`sweep`: a Ray Tune + Optuna sweep (`dcad.platform.sweep`); its best trial's run feeds register and promote."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dcad.platform.pipeline.errors import PipelineError
from dcad.platform.pipeline.spec import SweepStep
from dcad.platform.pipeline.steps.context import StepContext


def run_sweep_step(step: SweepStep, ctx: StepContext) -> dict:
    try:
        from dcad.platform.sweep import load_sweep_spec, run_sweep
    except ImportError as err:
        raise PipelineError(f"step {step.name}: sweeps are not available in this installation ({err})") from None

    spec = _with_changes(load_sweep_spec(Path(step.spec)), step)
    try:
        result = run_sweep(spec, resume=ctx.resume, address=step.address, tracking_uri=ctx.tracking_uri, log=ctx.log)
    finally:
        _disconnect_ray()
    run_id = _field(result.best_trial, "run_id")
    if not run_id:
        raise PipelineError(f"step {step.name}: the sweep {spec.name} finished without a best trial with an MLflow run")
    ctx.log(f"best trial: run {run_id} (sweep run {result.parent_run_id})")
    return {
        "run_id": run_id,
        "parent_run_id": result.parent_run_id,
        "model_uri": _model_uri(ctx.tracking_uri, run_id),
        "registered_version": None if result.registered_version is None else str(result.registered_version),
        "data": str(Path(spec.dataset).resolve()),
    }


def _disconnect_ray() -> None:
    """Leave the cluster after the sweep: a driver still attached when the cluster goes away is killed by Ray."""
    import ray

    if ray.is_initialized():
        ray.shutdown()


def _with_changes(spec, step: SweepStep):
    """The sweep spec with the step's `set` fields and `data`, checked again like a spec file."""
    from dcad.platform.sweep.spec import parse_sweep_spec

    changes: dict[str, Any] = dict(step.set)
    if step.data:
        changes["dataset"] = step.data
    if not changes:
        return spec
    data = {**spec.model_dump(mode="json", exclude_none=True), **changes}
    return parse_sweep_spec(data, spec.source or step.spec)  # the source also anchors relative paths in the spec


def _field(trial: Any, name: str) -> Any:
    if trial is None:
        return None
    return trial.get(name) if isinstance(trial, dict) else getattr(trial, name, None)


def _model_uri(tracking_uri: str, run_id: str) -> str | None:
    from dcad.platform.store import mlflow_client

    run = mlflow_client(tracking_uri).get_run(run_id)
    return run.data.tags.get("dcad.model_uri")
