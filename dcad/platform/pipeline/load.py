"""Loading a pipeline file: YAML → `PipelineSpec`, then the checks pydantic cannot make (step names, references to
earlier steps' outputs, implicit inputs, metric names). Every problem is one line naming the file and the key."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import ValidationError

from dcad.core.metrics import METRIC_KEYS
from dcad.core.yaml_io import read_yaml_mapping
from dcad.platform.pipeline.errors import PipelineError
from dcad.platform.pipeline.refs import GLOBAL_NAMES, STEP_REF, references
from dcad.platform.pipeline.spec import KINDS, STEP_NAME, EvaluateStep, PipelineSpec, PromoteStep, StepSpec, SweepStep


def load_pipeline(path: str | Path) -> PipelineSpec:
    """Read and check a pipeline file (PipelineError naming the file and key on any problem)."""
    path = Path(path)
    data = _read_yaml(path)
    if isinstance(data.get("steps"), list):
        data["steps"] = [_with_name(step) for step in data["steps"]]
    try:
        spec = PipelineSpec.model_validate(data)
    except ValidationError as err:
        raise PipelineError(f"{path}: {_first_error(err)}") from None
    _check_names(path, spec)
    _check_references(path, spec)
    _check_implicit_inputs(path, spec)
    _check_metrics(path, spec)
    return spec


def _read_yaml(path: Path) -> dict:
    return read_yaml_mapping(path, "the pipeline file", PipelineError, " with 'name' and 'steps'")


def _with_name(step: Any) -> Any:
    """A step without a name is named after its kind."""
    if isinstance(step, dict) and "name" not in step and isinstance(step.get("kind"), str):
        return {**step, "name": step["kind"]}
    return step


def _first_error(err: ValidationError) -> str:
    e = err.errors()[0]
    loc = _location(e["loc"])
    if e["type"] == "extra_forbidden":
        return f"unknown key '{loc}'"
    if e["type"] == "union_tag_invalid":
        return f"{loc}: unknown step kind {e['input'].get('kind')!r} (choose from {', '.join(KINDS)})"
    if e["type"] == "union_tag_not_found":
        return f"{loc}: missing 'kind' (one of {', '.join(KINDS)})"
    if e["type"] == "missing":
        return f"missing key '{loc}'"
    return f"invalid value for '{loc}': {e['msg']}"


def _location(loc: tuple) -> str:
    """('steps', 2, 'train', 'profile') -> 'steps[2].profile' (the union tag is dropped)."""
    text, previous = "", None
    for part in loc:
        if isinstance(part, int):
            text += f"[{part}]"
        elif isinstance(previous, int) and part in KINDS:
            pass
        else:
            text += f".{part}" if text else str(part)
        previous = part
    return text or "<root>"


def _check_names(path: Path, spec: PipelineSpec) -> None:
    seen: set[str] = set()
    for i, step in enumerate(spec.steps):
        if not STEP_NAME.match(step.name):
            raise PipelineError(f"{path}: steps[{i}].name '{step.name}': use letters, digits, '_' and '-', starting with a letter")
        if step.name in seen:
            raise PipelineError(f"{path}: steps[{i}].name '{step.name}' is used twice (give each step its own name)")
        seen.add(step.name)


def _check_references(path: Path, spec: PipelineSpec) -> None:
    for expr in references(spec.work_dir or ""):
        if expr != "name":
            raise PipelineError(f"{path}: work_dir may only reference ${{name}}, not ${{{expr}}}")
    earlier: dict[str, StepSpec] = {}
    for i, step in enumerate(spec.steps):
        for expr in references(step.inputs()):
            _check_reference(path, i, step, expr, earlier)
        earlier[step.name] = step


def _check_reference(path: Path, index: int, step: StepSpec, expr: str, earlier: dict[str, StepSpec]) -> None:
    where = f"{path}: steps[{index}] ({step.name})"
    if expr in GLOBAL_NAMES:
        return
    match = STEP_REF.match(expr)
    if not match:
        raise PipelineError(f"{where}: unknown reference ${{{expr}}} (use ${{work_dir}}, ${{name}} or ${{steps.STEP.KEY}})")
    target, key = match.groups()
    if target not in earlier:
        raise PipelineError(f"{where}: ${{{expr}}} names '{target}', which is not an earlier step")
    outputs = type(earlier[target]).OUTPUTS
    if key not in outputs:
        raise PipelineError(f"{where}: ${{{expr}}}: step '{target}' has no output '{key}' (it has {', '.join(outputs)})")


def _check_implicit_inputs(path: Path, spec: PipelineSpec) -> None:
    produced: set[str] = set()
    for i, step in enumerate(spec.steps):
        for field_name, key in type(step).IMPLICIT.items():
            if getattr(step, field_name) is None and key not in produced and _required(step, field_name):
                raise PipelineError(
                    f"{path}: steps[{i}] ({step.name}): no '{field_name}' given and no earlier step produces '{key}'"
                )
        produced.update(type(step).OUTPUTS)


def _required(step: StepSpec, field_name: str) -> bool:
    """`promote.data` and `sweep.data` may stay empty (the run's recorded dataset, the sweep's own dataset)."""
    return not (isinstance(step, (PromoteStep, SweepStep)) and field_name == "data")


def _check_metrics(path: Path, spec: PipelineSpec) -> None:
    for i, step in enumerate(spec.steps):
        names = list(step.require) if isinstance(step, EvaluateStep) else list(getattr(step, "gate_metrics", []))
        unknown = sorted(set(names) - set(METRIC_KEYS))
        if unknown:
            raise PipelineError(f"{path}: steps[{i}] ({step.name}): unknown metric(s) {', '.join(unknown)} (choose from {', '.join(METRIC_KEYS)})")
