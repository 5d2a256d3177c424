"""The promotion gate: a candidate may not regress against the alias holder in any category.

Both models are evaluated on the same data; for every category the incumbent was measured on and
every gate metric, the candidate fails when `candidate < incumbent - tolerance`. A category the
candidate was not measured on is a regression. Undefined values (nan: e.g. a category without
anomalies) are reported and skipped.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

DEFAULT_GATE_METRICS = ("image_auroc", "pixel_auroc")
DEFAULT_TOLERANCE = 0.01


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

    @property
    def regressions(self) -> list[GateRow]:
        return [r for r in self.rows if r.regressed(self.tolerance)]

    @property
    def passed(self) -> bool:
        return not self.regressions


def check_gate(
    candidate: dict,
    incumbent: dict | None,
    metrics: tuple[str, ...] = DEFAULT_GATE_METRICS,
    tolerance: float = DEFAULT_TOLERANCE,
) -> GateResult:
    """Compare two evaluation results (`{"categories": {cat: {metric: v}}}`) per category and metric."""
    if tolerance < 0:
        raise ValueError("tolerance must be >= 0")
    if incumbent is None:
        return GateResult(tuple(metrics), tolerance, has_incumbent=False)
    rows = []
    cand_cats = candidate.get("categories", {})
    for cat, values in sorted(incumbent.get("categories", {}).items()):
        for metric in metrics:
            theirs = values.get(metric)
            if theirs is None:
                continue
            ours = cand_cats.get(cat, {}).get(metric) if cat in cand_cats else None
            rows.append(GateRow(cat, metric, float(theirs), None if ours is None else float(ours)))
    return GateResult(tuple(metrics), tolerance, rows)


def _nan(value: float) -> bool:
    return isinstance(value, float) and math.isnan(value)
