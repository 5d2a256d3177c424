"""A sweep spec (`sweeps/*.yaml`): what to search, how to judge it, and where to keep it.

Every error is one line naming the file and the key; each range bound and choice is tried on the base config.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from dcad.core.config import PROFILES, ConfigError, DCADConfig, load_config, validation_error_line
from dcad.core.errors import DcadError
from dcad.core.yaml_io import read_yaml_mapping

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
MEASURED_METRICS = ("ms_per_image", "train_seconds")  # measured inside a trial: costs, never a quality metric
TRIAL_CPUS = 0.01  # a multi-worker trial only drives its Ray Train run; 0 is refused by Ray


class SweepSpecError(DcadError):
    """A sweep spec is invalid; the message names the file and the key."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


Scalar = Union[bool, int, float, str, None]
Choice = Union[Scalar, list[Scalar]]
Condition = Annotated[dict[str, Any] | None, Field(description="Only sampled when these parameters have these values.")]


class _Range(_Strict):
    """A numeric parameter: `low < high`; a log scale needs `low > 0` (and step 1)."""

    @model_validator(mode="after")
    def _range(self):
        if not self.low < self.high:
            fmt = "g" if isinstance(self.low, float) else ""
            raise ValueError(f"low ({self.low:{fmt}}) must be below high ({self.high:{fmt}})")
        if self.log and (self.low <= 0 or getattr(self, "step", 1) != 1):
            raise ValueError("a log-scale int range needs low > 0 and step 1" if hasattr(self, "step") else
                             "a log-scale range needs low > 0")
        return self

    def probes(self) -> list[Any]:
        return [self.low, self.high]


class FloatParam(_Range):
    type: Literal["float"]
    low: float
    high: float
    log: bool = False
    when: Condition = None


class IntParam(_Range):
    type: Literal["int"]
    low: int
    high: int
    step: int = Field(1, ge=1)
    log: bool = False
    when: Condition = None


class CategoricalParam(_Strict):
    type: Literal["categorical"]
    choices: list[Choice] = Field(min_length=1)
    when: Condition = None

    def probes(self) -> list[Any]:
        return list(self.choices)


Param = Annotated[Union[FloatParam, IntParam, CategoricalParam], Field(discriminator="type")]


class Objective(_Strict):
    metric: str
    mode: Literal["max", "min"] = "max"


class SamplerSpec(_Strict):
    type: Literal["tpe", "random", "cmaes", "nsga2"] = "tpe"
    seed: int | None = 0


class EarlyStopping(_Strict):
    """ASHA on a validation metric; its clock is the global training epoch (base epochs, then refiner epochs)."""

    type: Literal["asha"] = "asha"
    metric: str | None = Field(None, description="Default: the first objective (must be a validation metric).")
    mode: Literal["max", "min"] | None = None
    grace_period: int = Field(1, ge=1)
    max_t: int = Field(..., ge=1)
    reduction_factor: float = Field(2.0, gt=1.0)

    @model_validator(mode="after")
    def _grace(self) -> "EarlyStopping":
        if self.grace_period > self.max_t:
            raise ValueError(f"grace_period ({self.grace_period}) must not exceed max_t ({self.max_t})")
        return self


class TrialResources(_Strict):
    workers: int = Field(1, ge=1)
    cpus_per_worker: float = Field(1.0, gt=0.0)
    gpus_per_worker: float = Field(0.0, ge=0.0)


class BaseConfig(_Strict):
    profile: str | None = None
    config: str | None = Field(None, description="A config YAML (relative to the spec file).")
    overrides: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _one_source(self) -> "BaseConfig":
        if self.profile is None and self.config is None:
            raise ValueError("give a profile or a config file")
        if self.profile is not None and self.profile not in PROFILES:
            raise ValueError(f"unknown profile '{self.profile}' (choose from {', '.join(PROFILES)})")
        return self


class SweepSpec(_Strict):
    name: str
    base: BaseConfig
    dataset: str
    search_space: dict[str, Param] = Field(..., min_length=1)
    objective: list[Objective] = Field(..., min_length=1)
    sampler: SamplerSpec = Field(default_factory=SamplerSpec)
    early_stopping: EarlyStopping | None = None
    num_trials: int = Field(8, ge=1)
    max_concurrent: int = Field(1, ge=1)
    resources: TrialResources = Field(default_factory=TrialResources)
    time_budget_s: float | None = Field(None, gt=0)
    storage: str = Field(".dcad/sweeps", description="A directory or s3://bucket/prefix; the sweep lives in STORAGE/NAME.")
    study_storage: str | None = Field(None, description="Optuna storage URL (default: sqlite file in the sweep directory).")
    tracking_uri: str | None = None
    experiment: str = "dcad"
    register_best: str | None = None
    register_floor: float = Field(0.6, ge=0.0, le=1.0, description=(
        "The best trial is registered only if its validation image and pixel AUROC are at least this (0: always)."))
    source: str | None = Field(None, exclude=True, description="The spec file (set by the loader).")
    series: str | None = Field(None, exclude=True, description=(
        "The spec's own name when this run of it got a numbered one (NAME-2, NAME-3 …; set by the planner)."))

    @property
    def multi_objective(self) -> bool:
        return len(self.objective) > 1

    @property
    def primary(self) -> Objective:
        return self.objective[0]

    @property
    def objectives(self) -> list[tuple[str, str]]:
        return [(o.metric, o.mode) for o in self.objective]

    @property
    def asha_metric(self) -> tuple[str, str] | None:
        es = self.early_stopping
        if es is None:
            return None
        metric = es.metric or self.primary.metric
        return metric, es.mode or dict(self.objectives).get(metric) or ("min" if metric.endswith("loss") else "max")

    @property
    def shares_base(self) -> bool:
        """No swept key changes the base branch (or the features): every trial trains the same one."""
        from dcad.train.shared_stages import trained_stages

        return not trained_stages(list(self.search_space)) & {"features", "base"}

    def config_path(self) -> Path | None:
        if self.base.config is None:
            return None
        spec_dir = Path(self.source).resolve().parent if self.source else Path.cwd()
        return spec_dir / self.base.config  # an absolute `config` stays itself

    def base_config(self, params: dict[str, Any] | None = None) -> DCADConfig:
        """The trial's config: base profile or file, the spec's overrides, then the sampled `params`."""
        overrides = {**self.base.overrides, **(params or {})}
        return load_config(profile=self.base.profile, config_path=self.config_path(), overrides=overrides)

    def dataset_path(self) -> Path:
        return Path(self.dataset).expanduser().resolve()

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json", exclude_none=True), sort_keys=False)


def load_sweep_spec(path: str | Path) -> SweepSpec:
    """Read, parse and validate a sweep spec (SweepSpecError naming the file and key on any problem)."""
    return parse_sweep_spec(read_yaml_mapping(path, "sweep spec", SweepSpecError), str(path))


def parse_sweep_spec(data: dict[str, Any], source: str = "sweep spec") -> SweepSpec:
    try:
        spec = SweepSpec.model_validate({**data, "source": source if source != "sweep spec" else None})
        check_spec(spec)
    except ValidationError as err:
        raise SweepSpecError(f"{source}: {validation_error_line(err, _spec_key)}") from None
    except (ValueError, ConfigError) as err:
        raise SweepSpecError(f"{source}: {err}") from None
    return spec


_PARAM_KINDS = ("FloatParam", "IntParam", "CategoricalParam", "float", "int", "categorical")  # no key of the spec


def _spec_key(loc: tuple) -> str:
    parts = [str(p) for p in loc if not str(p).startswith(("function-after", "tagged-union")) and str(p) not in _PARAM_KINDS]
    return ".".join(parts) or "<root>"


def check_spec(spec: SweepSpec) -> None:
    """Cross-field checks (ValueError / ConfigError with the key in the message)."""
    if not NAME_PATTERN.match(spec.name):
        raise ValueError(f"invalid value for 'name': '{spec.name}' (letters, digits, '.', '_', '-'; at most 64)")
    _check_base(spec)
    _check_conditions(spec.search_space)
    names = [o.metric for o in spec.objective]
    if len(set(names)) != len(names):
        raise ValueError(f"invalid value for 'objective': metric listed twice ({names})")
    for i, name in enumerate(names):
        key = f"objective.{i}.metric"
        if name.startswith("test_"):
            raise ValueError(f"invalid value for '{key}': '{name}' is a test-split metric; sweeps select on validation (val_*) only")
        if not (name.startswith("val_") or name in MEASURED_METRICS):
            raise ValueError(f"invalid value for '{key}': '{name}' (use a validation metric val_* or one of {', '.join(MEASURED_METRICS)})")
    if spec.sampler.type == "cmaes":
        if spec.multi_objective:
            raise ValueError("invalid value for 'sampler.type': cmaes handles one objective only (use tpe or nsga2)")
        if any(p.when for p in spec.search_space.values()):
            raise ValueError("invalid value for 'sampler.type': cmaes cannot sample conditional parameters (use tpe)")
    _check_early_stopping(spec)


def _check_base(spec: SweepSpec) -> None:
    path = spec.config_path()
    if path is not None and not path.is_file():
        raise ValueError(f"invalid value for 'base.config': {path} does not exist")
    try:
        spec.base_config()
    except ConfigError as err:
        raise ValueError(f"base config: {err}") from None
    for key, param in spec.search_space.items():
        check_config_key(key)
        for value in param.probes():
            try:
                spec.base_config({key: value})
            except ConfigError as err:
                reason = str(err).split(": ", 1)[-1]
                raise ValueError(f"search_space.{key}: value {value!r} is refused by the config ({reason})") from None


def check_config_key(key: str) -> None:
    """ValueError unless `key` is a dotted path to a (leaf) field of DCADConfig."""
    model: Any = DCADConfig
    parts = key.split(".")
    for i, part in enumerate(parts):
        fields = getattr(model, "model_fields", None)
        if fields is None or part not in fields:
            where = ".".join(parts[:i]) or "the config"
            raise ValueError(f"search_space.{key}: '{part}' is not a field of {where}")
        annotation = fields[part].annotation
        model = annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None
    if model is not None:
        raise ValueError(f"search_space.{key}: is a section, not a field (name one of its fields)")


def _check_conditions(space: dict[str, Param]) -> None:
    """A `when` names an earlier parameter, and (of a categorical one) only its choices."""
    seen: dict[str, Param] = {}
    for key, param in space.items():
        for other, wanted in (param.when or {}).items():
            if other not in seen:
                later = " (it must come before this one)" if other in space else ""
                raise ValueError(f"search_space.{key}.when: '{other}' is not an earlier parameter of the search space{later}")
            parent = seen[other]
            bad = [v for v in (wanted if isinstance(wanted, list) else [wanted]) if v not in parent.probes()]
            if bad and isinstance(parent, CategoricalParam):
                raise ValueError(f"search_space.{key}.when: {bad} not among the choices of '{other}' {parent.choices}")
        seen[key] = param


def _check_early_stopping(spec: SweepSpec) -> None:
    if spec.early_stopping is None:
        return
    es, (metric, _) = spec.early_stopping, spec.asha_metric
    if not metric.startswith("val_"):
        raise ValueError(f"invalid value for 'early_stopping.metric': ASHA needs a validation metric (val_*), not '{metric}'")

    cfg = spec.base_config()
    base_epochs = cfg.base_epochs
    total = cfg.total_epochs
    if es.grace_period > total:
        raise ValueError(f"invalid value for 'early_stopping.grace_period': {es.grace_period} exceeds the {total} epochs a trial trains")
    if not spec.shares_base:
        return
    # every trial trains the same base branch: trials only differ once the refiner trains
    if es.grace_period <= base_epochs:
        raise ValueError(
            f"invalid value for 'early_stopping.grace_period': {es.grace_period} is within the {base_epochs} base-branch epochs, "
            f"where every trial of this search space is the same model; use grace_period >= {base_epochs + 1}"
        )
    if not cfg.train.validate_refiner:
        raise ValueError("invalid value for 'early_stopping': train.validate_refiner is false, so refiner epochs report "
                         "no validation metric for ASHA to compare; set it true or drop early_stopping")
