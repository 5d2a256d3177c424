"""The promotion gate: the candidate clears a floor on its means and regresses in no category against the
alias holder by more than the tolerance (rules in docs/cluster.md, "The model registry")."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

DEFAULT_GATE_METRICS = ("image_auroc", "pixel_auroc")
DEFAULT_TOLERANCE = 0.01
DEFAULT_FLOOR = 0.6


def _defined(value) -> float | None:
    return None if value is None or math.isnan(float(value)) else float(value)


@dataclass
class GateRow:
    category: str
    metric: str
    incumbent: float
    candidate: float | None  # None: the candidate has no value for this category

    @property
    def delta(self) -> float | None:
        ours, theirs = _defined(self.candidate), _defined(self.incumbent)
        return None if ours is None or theirs is None else ours - theirs

    def regressed(self, tolerance: float) -> bool:
        return self.candidate is None or (self.delta is not None and self.delta < -tolerance)

    def to_dict(self) -> dict:
        return {**asdict(self), "delta": self.delta}


@dataclass
class GateResult:
    metrics: tuple[str, ...]
    tolerance: float
    rows: list[GateRow] = field(default_factory=list)
    has_incumbent: bool = True
    floor: float = 0.0
    below_floor: dict[str, float | None] = field(default_factory=dict)  # gate metric -> candidate's mean

    @property
    def regressions(self) -> list[GateRow]:
        return [r for r in self.rows if r.regressed(self.tolerance)]

    @property
    def passed(self) -> bool:
        return not self.regressions and not self.below_floor

    def floor_text(self) -> str:
        shown = ", ".join(f"{m} {'missing' if v is None else f'{v:.4f}'}" for m, v in self.below_floor.items())
        return f"mean {shown} below the floor {self.floor:g}"


def check_gate(candidate: dict, incumbent: dict | None, metrics: tuple[str, ...] = DEFAULT_GATE_METRICS,
               tolerance: float = DEFAULT_TOLERANCE, floor: float = 0.0) -> GateResult:
    """Gate two evaluation results (`{"categories": {cat: {metric: v}}, "mean": {metric: v}}`)."""
    result = GateResult(tuple(metrics), tolerance, has_incumbent=incumbent is not None, floor=floor,
                        below_floor=below_floor(candidate, metrics, floor))
    ours = candidate.get("categories", {})
    for cat, values in sorted((incumbent or {}).get("categories", {}).items()):
        for metric in metrics:
            if values.get(metric) is not None:
                mine = ours.get(cat, {}).get(metric)
                result.rows.append(GateRow(cat, metric, float(values[metric]), None if mine is None else float(mine)))
    return result


def below_floor(result: dict, metrics: tuple[str, ...], floor: float) -> dict[str, float | None]:
    """The gate metrics whose mean is under `floor` (None: not measured), with the mean."""
    if floor <= 0:
        return {}
    means = {metric: _defined(result.get("mean", {}).get(metric)) for metric in metrics}
    return {metric: value for metric, value in means.items() if value is None or value < floor}
