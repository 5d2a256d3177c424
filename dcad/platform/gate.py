"""The promotion gate: a candidate may not regress against the alias holder in any category.

A candidate must first clear an absolute floor: the mean of every gate metric over its categories is
at least `floor` (a first holder included; a model no better than chance is never promoted). Both
models are then evaluated on the same data; for every category the incumbent was measured on and
every gate metric, the candidate fails when `candidate < incumbent - tolerance`. A category the
candidate was not measured on is a regression. Undefined values (nan: e.g. a category without
anomalies) are reported and skipped.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

DEFAULT_GATE_METRICS = ("image_auroc", "pixel_auroc")
DEFAULT_TOLERANCE = 0.01
DEFAULT_FLOOR = 0.6


@dataclass
class GateRow:
    category: str
    metric: str
    incumbent: float
    candidate: float | None  # None: the candidate has no value for this category

    @property
    def delta(self) -> float | None:
        if self.candidate is None or _nan(self.candidate) or _nan(self.incumbent):
            return None
        return self.candidate - self.incumbent

    def regressed(self, tolerance: float) -> bool:
        if self.candidate is None:
            return True
        delta = self.delta
        return delta is not None and delta < -tolerance

    def to_dict(self) -> dict:
        return {"category": self.category, "metric": self.metric, "incumbent": self.incumbent, "candidate": self.candidate, "delta": self.delta}


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


def check_gate(
    candidate: dict,
    incumbent: dict | None,
    metrics: tuple[str, ...] = DEFAULT_GATE_METRICS,
    tolerance: float = DEFAULT_TOLERANCE,
    floor: float = 0.0,
) -> GateResult:
    """Check the candidate's means against `floor`, then compare it with the incumbent per category and metric
    (evaluation results: `{"categories": {cat: {metric: v}}, "mean": {metric: v}}`)."""
    if tolerance < 0:
        raise ValueError("tolerance must be >= 0")
    below = below_floor(candidate, metrics, floor)
    if incumbent is None:
        return GateResult(tuple(metrics), tolerance, has_incumbent=False, floor=floor, below_floor=below)
    rows = []
    cand_cats = candidate.get("categories", {})
    for cat, values in sorted(incumbent.get("categories", {}).items()):
        for metric in metrics:
            theirs = values.get(metric)
            if theirs is None:
                continue
            ours = cand_cats.get(cat, {}).get(metric) if cat in cand_cats else None
            rows.append(GateRow(cat, metric, float(theirs), None if ours is None else float(ours)))
    return GateResult(tuple(metrics), tolerance, rows, floor=floor, below_floor=below)


def below_floor(result: dict, metrics: tuple[str, ...], floor: float) -> dict[str, float | None]:
    """The gate metrics whose mean is under `floor` (None: not measured), with the mean."""
    if floor <= 0:
        return {}
    means = result.get("mean", {})
    low = {}
    for metric in metrics:
        value = means.get(metric)
        value = None if value is None or _nan(float(value)) else float(value)
        if value is None or value < floor:
            low[metric] = value
    return low


def _nan(value: float) -> bool:
    return isinstance(value, float) and math.isnan(value)
