"""Read a pipeline file into a `PipelineSpec` and make the checks pydantic cannot (one-line errors naming file and key)."""

from __future__ import annotations

from pathlib import Path

from pydantic import ValidationError

from dcad.core.config import validation_error_line
from dcad.core.metrics import METRIC_KEYS
from dcad.core.yaml_io import read_yaml_mapping
from dcad.platform.pipeline.spec import GLOBAL_NAMES, KINDS, STEP_NAME, STEP_REF, PipelineError, PipelineSpec, StepSpec, references
from dcad.platform.pipeline.spec import EvaluateStep, PromoteStep, SweepStep


def load_pipeline(path: str | Path) -> PipelineSpec:
    """Read and check a pipeline file (PipelineError naming the file and key on any problem)."""
    path = Path(path)
    data = read_yaml_mapping(path, "the pipeline file", PipelineError, " with 'name' and 'steps'")
    if isinstance(data.get("steps"), list):  # a step without a name is named after its kind
        data["steps"] = [{**s, "name": s["kind"]} if isinstance(s, dict) and "name" not in s and isinstance(s.get("kind"), str)
                         else s for s in data["steps"]]
    try:
        spec = PipelineSpec.model_validate(data)
    except ValidationError as err:
        raise PipelineError(f"{path}: {validation_error_line(err, _location, **_UNION_TAG_ERRORS)}") from None
    for expr in references(spec.work_dir or ""):
        if expr != "name":
            raise PipelineError(f"{path}: work_dir may only reference ${{name}}, not ${{{expr}}}")
    earlier: dict[str, StepSpec] = {}
    for i, step in enumerate(spec.steps):
        _check_step(f"{path}: steps[{i}]", step, earlier)
        earlier[step.name] = step
    return spec


_UNION_TAG_ERRORS = {
    "union_tag_invalid": lambda e, loc: f"{loc}: unknown step kind {e['input'].get('kind')!r} (choose from {', '.join(KINDS)})",
    "union_tag_not_found": lambda e, loc: f"{loc}: missing 'kind' (one of {', '.join(KINDS)})",
}


def _location(loc: tuple) -> str:
    """('steps', 2, 'train', 'profile') -> 'steps[2].profile' (the union tag after an index is dropped)."""
    parts = [p for i, p in enumerate(loc) if not (i and isinstance(loc[i - 1], int) and p in KINDS)]
    return "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in parts).lstrip(".") or "<root>"


def _check_step(where: str, step: StepSpec, earlier: dict[str, StepSpec]) -> None:
    """The step's name, its references to earlier steps' outputs, its implicit inputs and its metric names."""
    if not STEP_NAME.match(step.name):
        raise PipelineError(f"{where}.name '{step.name}': use letters, digits, '_' and '-', starting with a letter")
    if step.name in earlier:
        raise PipelineError(f"{where}.name '{step.name}' is used twice (give each step its own name)")
    where = f"{where} ({step.name})"
    for expr in references(step.inputs()):
        match = STEP_REF.match(expr)
        if expr in GLOBAL_NAMES:
            continue
        if not match:
            raise PipelineError(f"{where}: unknown reference ${{{expr}}} (use ${{work_dir}}, ${{name}} or ${{steps.STEP.KEY}})")
        target, key = match.groups()
        if target not in earlier:
            raise PipelineError(f"{where}: ${{{expr}}} names '{target}', which is not an earlier step")
        outputs = type(earlier[target]).OUTPUTS
        if key not in outputs:
            raise PipelineError(f"{where}: ${{{expr}}}: step '{target}' has no output '{key}' (it has {', '.join(outputs)})")
    filled = step.implicit(list(earlier.values()))
    for field_name, key in type(step).IMPLICIT.items():
        optional = isinstance(step, (PromoteStep, SweepStep)) and field_name == "data"  # the run's or sweep's own dataset
        if getattr(step, field_name) is None and field_name not in filled and not optional:
            raise PipelineError(f"{where}: no '{field_name}' given and no earlier step produces '{key}'")
    names = list(step.require) if isinstance(step, EvaluateStep) else list(getattr(step, "gate_metrics", []))
    unknown = sorted(set(names) - set(METRIC_KEYS))
    if unknown:
        raise PipelineError(f"{where}: unknown metric(s) {', '.join(unknown)} (choose from {', '.join(METRIC_KEYS)})")
