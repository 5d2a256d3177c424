"""Run a pipeline's steps in order, feeding each step the outputs of the earlier ones; plan it for --dry-run."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from pydantic import ValidationError

from dcad.core.config import validation_error_line
from dcad.platform.errors import GateRefusedError, describe
from dcad.platform.mlflow_store import dcad_home, resolve_tracking_uri
from dcad.platform.pipeline.load import load_pipeline
from dcad.platform.pipeline.spec import PipelineError, PipelineSpec, StepSpec, resolve
from dcad.platform.pipeline.state import STATE_FILE, PipelineState
from dcad.platform.pipeline.steps import EXECUTORS, StepContext, StopPipeline


@dataclass
class StepOutcome:
    name: str
    kind: str
    action: str  # run | skip (finished before) | planned (--dry-run)
    inputs: dict[str, Any] = field(default_factory=dict)
    outputs: dict[str, Any] = field(default_factory=dict)
    seconds: float | None = None


@dataclass
class PipelineRun:
    spec: PipelineSpec
    work_dir: Path
    state_file: Path
    tracking_uri: str
    steps: list[StepOutcome] = field(default_factory=list)


def run_pipeline(path: str | Path, *, resume: bool = False, dry_run: bool = False, tracking_uri: str | None = None,
                 device: str | None = None, log: Callable[[str], None] = print) -> PipelineRun:
    """Run (or with `dry_run` only plan) the pipeline in `path`; `resume` skips steps finished before."""
    source = Path(path)
    spec = load_pipeline(source)
    work_dir = (dcad_home() / "pipelines" / spec.name if spec.work_dir is None  # work_dir may hold ${name}
                else Path(resolve(spec.work_dir, {"name": spec.name}, {})).expanduser().resolve())
    run = PipelineRun(spec, work_dir, work_dir / STATE_FILE, resolve_tracking_uri(tracking_uri, spec.tracking_uri))
    state = (PipelineState.load if resume else PipelineState)(run.state_file, spec.name, str(source.resolve()))
    ctx = StepContext(spec.name, work_dir, run.tracking_uri, spec.experiment, device or spec.device, resume, log)
    scope = {"work_dir": str(work_dir), "name": spec.name}
    outputs: dict[str, dict[str, Any]] = {}
    rerun = not resume  # once one step runs, every step after it runs too
    for index, step in enumerate(spec.steps, start=1):
        where = f"[{index}/{len(spec.steps)}] {step.name} ({step.kind})"
        record = None if rerun else state.finished(step.name, step.digest())
        inputs = {**step.inputs(), **step.implicit(spec.steps[:index - 1])}
        if record is not None:
            log(f"{where}: finished before, skipped")
            outcome = StepOutcome(step.name, step.kind, "skip", resolve(inputs, scope, outputs, keep_unknown=True),
                                  record["outputs"], record["seconds"])
        elif dry_run:
            outcome = StepOutcome(step.name, step.kind, "planned", resolve(inputs, scope, outputs, keep_unknown=True))
        else:
            log(where)
            outcome = _run_step(step, resolve(inputs, scope, outputs), state, ctx)
        rerun = rerun or record is None
        outputs[step.name] = outcome.outputs
        run.steps.append(outcome)
    return run


def _run_step(step: StepSpec, inputs: dict[str, Any], state: PipelineState, ctx: StepContext) -> StepOutcome:
    try:  # the step spec again with the resolved values: a reference that yields the wrong type is a one-line error
        resolved = type(step).model_validate({**inputs, "name": step.name, "kind": step.kind})
    except ValidationError as err:
        raise PipelineError(f"step {step.name}, after substitution: {validation_error_line(err)}") from None
    state.start(step.name, step.digest())
    started = time.perf_counter()
    try:
        outputs = EXECUTORS[step.kind](resolved, ctx)
    except StopPipeline as stop:
        state.end(step.name, time.perf_counter() - started, stop.outputs)
        raise GateRefusedError(str(stop)) from None
    except BaseException as err:
        state.end(step.name, time.perf_counter() - started, error=describe(err))
        raise
    seconds = time.perf_counter() - started
    state.end(step.name, seconds, outputs)
    return StepOutcome(step.name, step.kind, "run", inputs, outputs, round(seconds, 2))

