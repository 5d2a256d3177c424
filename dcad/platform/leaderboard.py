"""Rank tracked runs by a metric, or a sweep's trials by the Pareto front of its objectives."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Callable, TypeVar

from dcad.platform.errors import TrackingError
from dcad.platform.mlflow_store import DEFAULT_EXPERIMENT, run_link

DEFAULT_METRIC = "test_image_auroc"
SHOWN_METRICS = ("test_image_auroc", "test_pixel_auroc", "test_aupro", "val_image_auroc")
MAX_PARAMS = 6
LOWER_IS_BETTER = ("loss", "error", "seconds", "ms_per")
T = TypeVar("T")


@dataclass
class LeaderboardRow:
    rank: int
    run_id: str
    run_name: str
    status: str
    value: float | None
    metrics: dict[str, float]
    params: dict[str, str]
    parent: str | None = None
    link: str | None = None


@dataclass
class Leaderboard:
    metric: str
    ascending: bool
    experiment: str
    rows: list[LeaderboardRow] = field(default_factory=list)
    param_keys: list[str] = field(default_factory=list)
    metric_keys: list[str] = field(default_factory=list)
    pareto: bool = False  # rows are the Pareto front of a sweep's objectives (`metric` is the first)
    source: str = ""  # what the rows come from when narrower than the experiment (e.g. "sweep quickstart-2")

    def to_dict(self) -> dict:
        return {"pareto": self.pareto, "metric": self.metric, "order": "ascending" if self.ascending else "descending",
                "experiment": self.experiment, "source": self.source, "runs": [asdict(r) for r in self.rows]}


def dominates(a: dict[str, float], b: dict[str, float], objectives: list[tuple[str, str]]) -> bool:
    """Whether `a` dominates `b` on the (metric, max|min) objectives: no worse on each, better on one."""
    pairs = [(a[m], b[m]) if mode == "max" else (-a[m], -b[m]) for m, mode in objectives]
    return all(x >= y for x, y in pairs) and any(x > y for x, y in pairs)


def pareto_front(items: list[T], objectives: list[tuple[str, str]], scores: Callable[[T], dict[str, float]]) -> list[T]:
    """The items whose scores no other item's dominate, in their order."""
    values = [scores(item) for item in items]
    return [item for item, v in zip(items, values) if not any(dominates(w, v, objectives) for w in values if w is not v)]


def build_leaderboard(client, uri: str, experiment: str | None = None, parent: str | None = None,
                      metric: str = DEFAULT_METRIC, top: int = 10, ascending: bool | None = None,
                      finished_only: bool = True) -> Leaderboard:
    """The `top` runs of `experiment` (or the children of run or sweep `parent`) that have `metric`, best first;
    FINISHED runs only unless `finished_only=False` (a run still RUNNING, or one whose process died, is no leader)."""
    if top < 1:
        raise TrackingError("--top must be at least 1")
    if ascending is None:
        ascending = any(word in metric for word in LOWER_IS_BETTER)
    parent_run = resolve_parent(client, parent) if parent else None
    order = [f"metrics.`{metric}` {'ASC' if ascending else 'DESC'}", "attributes.start_time DESC"]
    runs, name = _search(client, experiment, parent_run, [metric], finished_only, order_by=order, max_results=top)
    return _board(Leaderboard(metric, ascending, name), runs, runs, parent_run, uri)


def build_pareto(client, uri: str, parent: str, finished_only: bool = True) -> Leaderboard:
    """The children of sweep `parent` (run id or name) on the Pareto front of its objectives, by the first one."""
    parent_run = resolve_parent(client, parent)
    objectives = sweep_objectives(parent_run)
    if not objectives:
        raise TrackingError(f"run {parent_run.info.run_id} records no sweep objectives (tag dcad.objectives); "
                            "is it a sweep's parent run?")
    runs, name = _search(client, None, parent_run, [m for m, _ in objectives], finished_only, max_results=1000)
    front = pareto_front(runs, objectives, lambda r: {m: r.data.metrics[m] for m, _ in objectives})
    first, mode = objectives[0]
    front.sort(key=lambda r: r.data.metrics[first], reverse=mode == "max")
    return _board(Leaderboard(first, mode == "min", name, pareto=True), runs, front, parent_run, uri,
                  [m for m, _ in objectives])


def _search(client, experiment: str | None, parent_run, metrics: list[str], finished_only: bool, **search):
    """The runs (of `experiment`, or children of `parent_run`) that logged `metrics`; and the experiment's name."""
    filters = [f"metrics.`{m}` > -1e300" for m in metrics]  # only runs that logged the metric
    if finished_only:
        filters.append("attributes.status = 'FINISHED'")
    if parent_run is not None:
        filters.append(f"tags.mlflow.parentRunId = '{parent_run.info.run_id}'")
        exp = client.get_experiment(parent_run.info.experiment_id)
    else:
        name = experiment or DEFAULT_EXPERIMENT
        exp = client.get_experiment_by_name(name)
        if exp is None:
            known = ", ".join(sorted(e.name for e in client.search_experiments())) or "none"
            raise TrackingError(f"experiment '{name}' not found (experiments: {known})")
    return client.search_runs([exp.experiment_id], filter_string=" and ".join(filters), **search), exp.name


def _board(board: Leaderboard, runs: list, shown: list, parent_run, uri: str,
           metrics: list[str] | None = None) -> Leaderboard:
    """`board` with the `shown` runs as rows, the params that differ between `runs` and the shown metrics."""
    metrics = metrics or [board.metric]
    board.source = parent_label(parent_run) if parent_run is not None else ""
    board.metric_keys = [*metrics, *[m for m in SHOWN_METRICS if m not in metrics]]
    board.param_keys = varying_params([r.data.params for r in runs])
    for rank, run in enumerate(shown, start=1):
        values = run.data.metrics
        board.rows.append(LeaderboardRow(
            rank, run.info.run_id, run.info.run_name or "", run.info.status, values.get(board.metric),
            {k: values[k] for k in board.metric_keys if k in values},
            {k: run.data.params.get(k, "") for k in board.param_keys},
            run.data.tags.get("mlflow.parentRunId"), run_link(uri, run.info.experiment_id, run.info.run_id)))
    return board


def varying_params(params: list[dict[str, str]], limit: int = MAX_PARAMS) -> list[str]:
    """Param keys whose values differ between the runs (none for one run; `profile` always), at most `limit`."""
    keys = sorted({k for p in params for k in p})
    chosen = [k for k in keys if len({p.get(k) for p in params}) > 1] if len(params) > 1 else []
    if "profile" in keys and "profile" not in chosen:
        chosen.insert(0, "profile")
    return chosen[:limit]


def resolve_parent(client, value: str):
    """The run of id `value` if it exists, else the latest parent run of the sweep (or the series of a spec run
    again: NAME, NAME-2 …) named `value`."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_run(value)
    except MlflowException:
        pass
    ids = [e.experiment_id for e in client.search_experiments()]
    safe = value.replace("'", "")
    runs = [
        run
        for tag in ("dcad.sweep", "dcad.sweep_series") if ids
        for run in client.search_runs(ids, filter_string=f"tags.`{tag}` = '{safe}' and tags.`dcad.kind` = 'sweep'",
                                      order_by=["attributes.start_time DESC"], max_results=1)
    ]
    if not runs:
        raise TrackingError(f"--parent {value}: no run with this id and no sweep with this name")
    return max(runs, key=lambda r: r.info.start_time)


def parent_label(run) -> str:
    """`sweep NAME` for a sweep's parent run, else `children of RUN_NAME`."""
    sweep = run.data.tags.get("dcad.sweep")
    if sweep and run.data.tags.get("dcad.kind") == "sweep":
        return f"sweep {sweep}"
    return f"children of {run.info.run_name or run.info.run_id}"


def sweep_objectives(run) -> list[tuple[str, str]]:
    """The (metric, mode) objectives a sweep's parent run recorded in its `dcad.objectives` tag."""
    text = run.data.tags.get("dcad.objectives")
    try:
        return [(o["metric"], o["mode"]) for o in json.loads(text)] if text else []
    except (ValueError, KeyError, TypeError):
        return []
