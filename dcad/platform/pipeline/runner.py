"""Run a pipeline's steps in order, feeding each step the outputs of the earlier ones; plan it for --dry-run."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from pydantic import ValidationError

from dcad.platform.errors import GateRefusedError, describe
from dcad.platform.pipeline.errors import PipelineError
from dcad.platform.pipeline.refs import resolve
from dcad.platform.pipeline.load import load_pipeline
from dcad.platform.pipeline.spec import PipelineSpec, StepSpec
from dcad.platform.pipeline.state import STATE_FILE, PipelineState
from dcad.platform.pipeline.steps import EXECUTORS, StepContext, StopPipeline
from dcad.platform.store import dcad_home, resolve_tracking_uri

Log = Callable[[str], None]


@dataclass
class StepOutcome:
    name: str
    kind: str
    action: str  # run | skip (--resume: finished before) | planned (--dry-run)
    inputs: dict[str, Any] = field(default_factory=dict)
    outputs: dict[str, Any] = field(default_factory=dict)
    seconds: float | None = None


@dataclass
class PipelineRun:
    spec: PipelineSpec
    source: Path
    work_dir: Path
    state_file: Path
    tracking_uri: str
    steps: list[StepOutcome] = field(default_factory=list)


def work_dir_of(spec: PipelineSpec) -> Path:
    """`work_dir` (with ${name}) relative to the current directory, default `.dcad/pipelines/NAME`."""
    if spec.work_dir is None:
        return dcad_home() / "pipelines" / spec.name
    return Path(resolve(spec.work_dir, {"name": spec.name}, {})).expanduser().resolve()


def run_pipeline(path: str | Path, *, resume: bool = False, dry_run: bool = False, tracking_uri: str | None = None,
                 device: str | None = None, log: Log = print) -> PipelineRun:
    """Run (or with `dry_run` only plan) the pipeline in `path`; `resume` skips steps finished before."""
    run, state, ctx = _prepare(Path(path), resume, tracking_uri, device, log)
    scope = {"work_dir": str(run.work_dir), "name": run.spec.name}
    outputs: dict[str, dict[str, Any]] = {}
    producers: dict[str, str] = {}
    rerun = not resume  # once one step runs, every step after it runs too
    for index, step in enumerate(run.spec.steps, start=1):
        where = f"[{index}/{len(run.spec.steps)}] {step.name} ({step.kind})"
        record = None if rerun else state.finished(step.name, step.digest())
        inputs = _with_implicit(step, producers)
        if record is not None:
            log(f"{where}: finished before, skipped")
            outcome = StepOutcome(step.name, step.kind, "skip", resolve(inputs, scope, outputs, keep_unknown=True), record.outputs, record.seconds)
        elif dry_run:
            outcome = StepOutcome(step.name, step.kind, "planned", resolve(inputs, scope, outputs, keep_unknown=True))
        else:
            log(where)
            outcome = _run_step(step, resolve(inputs, scope, outputs), state, ctx)
        rerun = rerun or record is None
        outputs[step.name] = outcome.outputs
        producers.update({key: step.name for key in type(step).OUTPUTS})
        run.steps.append(outcome)
    return run


def _prepare(source: Path, resume: bool, tracking_uri: str | None, device: str | None, log: Log) -> tuple[PipelineRun, PipelineState, StepContext]:
    """Load the spec; the run record, the state (recorded with --resume, else fresh) and the steps' context."""
    spec = load_pipeline(source)
    work_dir = work_dir_of(spec)
    uri = resolve_tracking_uri(tracking_uri, spec.tracking_uri)
    run = PipelineRun(spec, source, work_dir, work_dir / STATE_FILE, uri)
    origin = str(source.resolve())
    state = PipelineState.load(run.state_file, spec.name, origin) if resume else PipelineState.fresh(run.state_file, spec.name, origin)
    ctx = StepContext(spec.name, work_dir, run.tracking_uri, spec.experiment, device or spec.device, resume, log)
    return run, state, ctx


def _with_implicit(step: StepSpec, producers: dict[str, str]) -> dict[str, Any]:
    """The step's fields, with each empty implicit input replaced by a reference to its latest producer."""
    fields = step.inputs()
    for name, key in type(step).IMPLICIT.items():
        if fields.get(name) is None and key in producers:
            fields[name] = f"${{steps.{producers[key]}.{key}}}"
    return fields


def _run_step(step: StepSpec, inputs: dict[str, Any], state: PipelineState, ctx: StepContext) -> StepOutcome:
    resolved = _typed(step, inputs)
    state.start(step.name, step.digest())
    started = time.perf_counter()
    try:
        outputs = EXECUTORS[step.kind](resolved, ctx)
    except StopPipeline as stop:
        state.finish(step.name, stop.outputs, time.perf_counter() - started)
        raise GateRefusedError(str(stop)) from None
    except BaseException as err:
        state.fail(step.name, describe(err), time.perf_counter() - started)
        raise
    seconds = time.perf_counter() - started
    state.finish(step.name, outputs, seconds)
    return StepOutcome(step.name, step.kind, "run", inputs, outputs, round(seconds, 2))


def _typed(step: StepSpec, inputs: dict[str, Any]) -> StepSpec:
    """The step spec again with resolved values (a reference that yields the wrong type is a one-line error)."""
    try:
        return type(step).model_validate({**inputs, "name": step.name, "kind": step.kind})
    except ValidationError as err:
        first = err.errors()[0]
        key = ".".join(str(p) for p in first["loc"])
        raise PipelineError(f"step {step.name}: '{key}' after substitution: {first['msg']}") from None
