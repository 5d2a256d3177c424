"""The pipeline file as a typed spec (pydantic) and its `${...}` references; `load.py` checks what pydantic cannot."""

from __future__ import annotations

import hashlib
import json
import re
from typing import Annotated, Any, ClassVar, Iterator, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field

from dcad.core.metrics import METRIC_KEYS
from dcad.platform.errors import PlatformError
from dcad.platform.gate import DEFAULT_FLOOR, DEFAULT_GATE_METRICS, DEFAULT_TOLERANCE
from dcad.platform.mlflow_store import DEFAULT_EXPERIMENT

STEP_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,63}$")


class PipelineError(PlatformError):
    """The pipeline file is invalid, or a step's inputs cannot be resolved."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class StepSpec(_Strict):
    """Fields every step has; `OUTPUTS` are the keys later steps may reference."""

    name: str = ""
    OUTPUTS: ClassVar[tuple[str, ...]] = ()
    IMPLICIT: ClassVar[dict[str, str]] = {}  # field left empty -> output key taken from an earlier step

    def inputs(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude={"name", "kind"})

    def implicit(self, earlier: list[StepSpec]) -> dict[str, str]:
        """Each empty IMPLICIT field as a reference to the latest earlier step with that output."""
        producers = {key: s.name for s in earlier for key in type(s).OUTPUTS}
        return {f: f"${{steps.{producers[key]}.{key}}}" for f, key in self.IMPLICIT.items()
                if getattr(self, f) is None and key in producers}

    def digest(self) -> str:
        """Changes when the step's own fields change (so --resume runs it again)."""
        return hashlib.sha256(json.dumps(self.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()[:16]


class SynthStep(StepSpec):
    """Write the synthetic MVTec-layout benchmark."""

    kind: Literal["synth"]
    out: str = "${work_dir}/data"
    seed: int = Field(0, ge=0)
    size: int = Field(128, ge=16)
    categories: Optional[list[str]] = None
    train: int = Field(40, ge=1)
    test: int = Field(30, ge=1)
    OUTPUTS: ClassVar[tuple[str, ...]] = ("data", "digest")


class CheckStep(StepSpec):
    """Decode every image and mask of a dataset (fails naming the first bad file)."""

    kind: Literal["check"]
    data: Optional[str] = None
    layout: Literal["auto", "mvtec", "visa", "btad", "folder"] = "auto"
    OUTPUTS: ClassVar[tuple[str, ...]] = ("data", "digest")
    IMPLICIT: ClassVar[dict[str, str]] = {"data": "data"}


class TrainStep(StepSpec):
    """Train one model in this process, evaluate it on the test split, log it to MLflow."""

    kind: Literal["train"]
    data: Optional[str] = None
    profile: Literal["tiny", "cpu", "paper"] = "cpu"
    config: Optional[str] = None
    overrides: dict[str, Any] = Field(default_factory=dict)
    output: str = "${work_dir}/model"
    run_name: Optional[str] = None
    OUTPUTS: ClassVar[tuple[str, ...]] = ("run_id", "model_uri", "model_dir", "data")
    IMPLICIT: ClassVar[dict[str, str]] = {"data": "data"}


class SweepStep(StepSpec):
    """Run a sweep spec (`sweeps/*.yaml`) on Ray Tune; its best trial feeds the next steps."""

    kind: Literal["sweep"]
    spec: str
    data: Optional[str] = None  # replaces the sweep's `dataset` (default: the latest earlier `data`, if any)
    set: dict[str, Any] = Field(default_factory=dict)  # top-level sweep fields to replace, e.g. {num_trials: 2}
    address: Optional[str] = None
    OUTPUTS: ClassVar[tuple[str, ...]] = ("run_id", "parent_run_id", "model_uri", "registered_version", "data")
    IMPLICIT: ClassVar[dict[str, str]] = {"data": "data"}


class EvaluateStep(StepSpec):
    """Evaluate a model (directory, runs:/ or models:/ URI) on a dataset's test split; optional minimums."""

    kind: Literal["evaluate"]
    model: Optional[str] = None
    data: Optional[str] = None
    require: dict[str, float] = Field(default_factory=dict)
    OUTPUTS: ClassVar[tuple[str, ...]] = ("metrics_file", *METRIC_KEYS)
    IMPLICIT: ClassVar[dict[str, str]] = {"model": "model_uri", "data": "data"}


class RegisterStep(StepSpec):
    """Register a run's logged model as a version of `model_name` (no alias moves: that is `promote`)."""

    kind: Literal["register"]
    model_name: str
    run_id: Optional[str] = None
    OUTPUTS: ClassVar[tuple[str, ...]] = ("model_name", "version", "run_id")
    IMPLICIT: ClassVar[dict[str, str]] = {"run_id": "run_id"}


class PromoteStep(StepSpec):
    """Gated promotion: move the alias to the run's model only if it is not worse than the holder, per category."""

    kind: Literal["promote"]
    model_name: str
    run_id: Optional[str] = None
    alias: str = "champion"
    data: Optional[str] = None
    tolerance: float = Field(DEFAULT_TOLERANCE, ge=0.0)
    gate_metrics: list[str] = Field(default_factory=lambda: list(DEFAULT_GATE_METRICS))
    floor: float = Field(DEFAULT_FLOOR, ge=0.0, le=1.0)
    force: bool = False
    on_refusal: Literal["fail", "continue"] = "fail"
    OUTPUTS: ClassVar[tuple[str, ...]] = ("model_name", "version", "decision", "moved")
    IMPLICIT: ClassVar[dict[str, str]] = {"run_id": "run_id", "data": "data"}


STEP_TYPES = (SynthStep, CheckStep, TrainStep, SweepStep, EvaluateStep, RegisterStep, PromoteStep)
KINDS = tuple(t.model_fields["kind"].annotation.__args__[0] for t in STEP_TYPES)
AnyStep = Annotated[Union[STEP_TYPES], Field(discriminator="kind")]


class PipelineSpec(_Strict):
    name: str
    description: str = ""
    work_dir: Optional[str] = None  # default .dcad/pipelines/NAME
    tracking_uri: Optional[str] = None  # used when neither --tracking-uri nor MLFLOW_TRACKING_URI is given (default: local sqlite)
    experiment: str = DEFAULT_EXPERIMENT
    device: str = "auto"
    steps: list[AnyStep] = Field(min_length=1)


# `${...}` references inside step fields: `${work_dir}`, `${name}` and `${steps.STEP.KEY}` (an earlier step's output).
REF = re.compile(r"\$\{([^}]*)\}")
STEP_REF = re.compile(r"^steps\.([A-Za-z0-9_-]+)\.([A-Za-z0-9_]+)$")
GLOBAL_NAMES = ("work_dir", "name")


def references(value: Any) -> Iterator[str]:
    """Every reference expression (the text inside `${}`) in a nested value."""
    if isinstance(value, str):
        yield from (m.group(1).strip() for m in REF.finditer(value))
    elif isinstance(value, (dict, list, tuple)):
        for item in value.values() if isinstance(value, dict) else value:
            yield from references(item)


def resolve(value: Any, scope: dict[str, Any], outputs: dict[str, dict[str, Any]], keep_unknown: bool = False) -> Any:
    """`value` with references substituted; a string that is exactly one reference takes the output's type.
    With `keep_unknown`, references to outputs that do not exist yet stay as written (for --dry-run)."""
    if isinstance(value, dict):
        return {k: resolve(v, scope, outputs, keep_unknown) for k, v in value.items()}
    if isinstance(value, list):
        return [resolve(v, scope, outputs, keep_unknown) for v in value]
    if not isinstance(value, str):
        return value
    whole = REF.fullmatch(value.strip())
    if whole:
        return _lookup(whole.group(1).strip(), scope, outputs, keep_unknown, value)
    return REF.sub(lambda m: str(_lookup(m.group(1).strip(), scope, outputs, keep_unknown, m.group(0))), value)


def _lookup(expr: str, scope: dict[str, Any], outputs: dict[str, dict[str, Any]], keep_unknown: bool, raw: str) -> Any:
    if expr in scope:
        return scope[expr]
    match = STEP_REF.match(expr)
    if match and match.group(2) in outputs.get(match.group(1), {}):
        return outputs[match.group(1)][match.group(2)]
    if keep_unknown:
        return raw
    raise PipelineError(f"reference ${{{expr}}} has no value (the step it names has not produced '{expr.rsplit('.', 1)[-1]}')")
