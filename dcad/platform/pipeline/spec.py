"""The pipeline file as a typed spec (pydantic); `load.py` reads it and checks what pydantic cannot.

    name: quickstart
    work_dir: .dcad/pipelines/quickstart      # relative to the current directory
    experiment: dcad-quickstart
    steps:
      - {name: data, kind: synth, categories: [brick, hex_nut], train: 12, test: 8}
      - {name: train, kind: train, profile: tiny, data: "${steps.data.data}"}
      - {name: register, kind: register, model_name: dcad-quickstart}
      - {name: promote, kind: promote, model_name: dcad-quickstart, alias: champion}

Steps run in order. A field may hold `${work_dir}`, `${name}` or `${steps.STEP.KEY}` (an output of an
earlier step); `data`, `run_id` and `model` left out are taken from the latest earlier step that produced
`data`, `run_id` or `model_uri` (implicit passing).
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Annotated, Any, ClassVar, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field

from dcad.core.metrics import METRIC_KEYS
from dcad.platform.gate import DEFAULT_FLOOR, DEFAULT_GATE_METRICS, DEFAULT_TOLERANCE
from dcad.platform.store import DEFAULT_EXPERIMENT

STEP_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,63}$")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class StepSpec(_Strict):
    """Fields every step has; `OUTPUTS` are the keys later steps may reference."""

    name: str = ""
    OUTPUTS: ClassVar[tuple[str, ...]] = ()
    IMPLICIT: ClassVar[dict[str, str]] = {}  # field left empty -> output key taken from an earlier step

    def inputs(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude={"name", "kind"})

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
AnyStep = Annotated[Union[SynthStep, CheckStep, TrainStep, SweepStep, EvaluateStep, RegisterStep, PromoteStep], Field(discriminator="kind")]


class PipelineSpec(_Strict):
    name: str
    description: str = ""
    work_dir: Optional[str] = None  # default .dcad/pipelines/NAME
    tracking_uri: Optional[str] = None  # used when neither --tracking-uri nor MLFLOW_TRACKING_URI is given (default: local sqlite)
    experiment: str = DEFAULT_EXPERIMENT
    device: str = "auto"
    steps: list[AnyStep] = Field(min_length=1)

    def step(self, name: str) -> StepSpec:
        return next(s for s in self.steps if s.name == name)
