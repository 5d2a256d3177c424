"""Rank tracked runs by a metric: their key params (those that differ between the runs) and metrics."""

from __future__ import annotations

from dataclasses import dataclass, field

from dcad.platform.errors import TrackingError
from dcad.platform.store import DEFAULT_EXPERIMENT, run_link

DEFAULT_METRIC = "test_image_auroc"
SHOWN_METRICS = ("test_image_auroc", "test_pixel_auroc", "test_aupro", "val_image_auroc")
MAX_PARAMS = 6
LOWER_IS_BETTER = ("loss", "error", "seconds", "ms_per")


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

    def to_dict(self) -> dict:
        return dict(vars(self))


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
        return {
            "pareto": self.pareto,
            "metric": self.metric,
            "order": "ascending" if self.ascending else "descending",
            "experiment": self.experiment,
            "source": self.source,
            "runs": [r.to_dict() for r in self.rows],
        }


def status_filter(finished_only: bool) -> list[str]:
    return ["attributes.status = 'FINISHED'"] if finished_only else []


def lower_is_better(metric: str) -> bool:
    return any(word in metric for word in LOWER_IS_BETTER)


def build_leaderboard(
    client,
    uri: str,
    experiment: str | None = None,
    parent: str | None = None,
    metric: str = DEFAULT_METRIC,
    top: int = 10,
    ascending: bool | None = None,
    finished_only: bool = True,
) -> Leaderboard:
    """The `top` runs of `experiment` (or the children of run `parent`) that have `metric`, best first;
    only FINISHED runs unless `finished_only=False` (a run still RUNNING, or one whose process died, is no leader)."""
    if top < 1:
        raise TrackingError("--top must be at least 1")
    ascending = lower_is_better(metric) if ascending is None else ascending
    parent = resolve_parent(client, parent) if parent else None
    experiment_id, name = _experiment(client, experiment, parent)
    filters = [f"metrics.`{metric}` > -1e300", *status_filter(finished_only)]  # only runs that logged the metric
    if parent:
        filters.append(f"tags.mlflow.parentRunId = '{parent}'")
    runs = client.search_runs(
        [experiment_id],
        filter_string=" and ".join(filters),
        order_by=[f"metrics.`{metric}` {'ASC' if ascending else 'DESC'}", "attributes.start_time DESC"],
        max_results=top,
    )
    board = Leaderboard(metric, ascending, name, source=parent_label(client, parent) if parent else "")
    board.metric_keys = [metric, *[m for m in SHOWN_METRICS if m != metric]]
    board.param_keys = varying_params([r.data.params for r in runs])
    for i, run in enumerate(runs, start=1):
        board.rows.append(_row(i, run, board, uri))
    return board


def _experiment(client, experiment: str | None, parent: str | None) -> tuple[str, str]:
    from mlflow.exceptions import MlflowException

    if parent:
        try:
            run = client.get_run(parent)
        except MlflowException:
            raise TrackingError(f"parent run '{parent}' not found") from None
        exp = client.get_experiment(run.info.experiment_id)
        return exp.experiment_id, exp.name
    name = experiment or DEFAULT_EXPERIMENT
    exp = client.get_experiment_by_name(name)
    if exp is None:
        known = ", ".join(sorted(e.name for e in client.search_experiments())) or "none"
        raise TrackingError(f"experiment '{name}' not found (experiments: {known})")
    return exp.experiment_id, exp.name


def varying_params(params: list[dict[str, str]], limit: int = MAX_PARAMS) -> list[str]:
    """Param keys whose values differ between the runs (all of them when there is one run), at most `limit`."""
    keys = sorted({k for p in params for k in p})
    varying = [k for k in keys if len({p.get(k) for p in params}) > 1]
    chosen = varying if len(params) > 1 else []
    if "profile" in keys and "profile" not in chosen:
        chosen.insert(0, "profile")
    return chosen[:limit]


def _row(rank: int, run, board: Leaderboard, uri: str) -> LeaderboardRow:
    metrics = run.data.metrics
    return LeaderboardRow(
        rank=rank,
        run_id=run.info.run_id,
        run_name=run.info.run_name or "",
        status=run.info.status,
        value=metrics.get(board.metric),
        metrics={k: metrics[k] for k in board.metric_keys if k in metrics},
        params={k: run.data.params.get(k, "") for k in board.param_keys},
        parent=run.data.tags.get("mlflow.parentRunId"),
        link=run_link(uri, run.info.experiment_id, run.info.run_id),
    )


# ---- sweeps: parent by name, Pareto front ------------------------------------------------------------
def resolve_parent(client, value: str) -> str:
    """`value` as a run id if such a run exists, else the latest parent run of the sweep named `value`
    (a spec run again is the series NAME, NAME-2 …: its latest run)."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_run(value).info.run_id
    except MlflowException:
        pass
    ids = [e.experiment_id for e in client.search_experiments()]
    safe = value.replace("'", "")
    runs = [
        run
        for tag in ("dcad.sweep", "dcad.sweep_series") if ids
        for run in client.search_runs(
            ids, filter_string=f"tags.`{tag}` = '{safe}' and tags.`dcad.kind` = 'sweep'",
            order_by=["attributes.start_time DESC"], max_results=1,
        )
    ]
    if not runs:
        raise TrackingError(f"--parent {value}: no run with this id and no sweep with this name")
    return max(runs, key=lambda r: r.info.start_time).info.run_id


def parent_label(client, parent: str) -> str:
    """`sweep NAME` for a sweep's parent run, else `children of RUN_NAME`."""
    run = client.get_run(parent)
    sweep = run.data.tags.get("dcad.sweep")
    return f"sweep {sweep}" if sweep and run.data.tags.get("dcad.kind") == "sweep" else f"children of {run.info.run_name or parent}"


def sweep_objectives(client, parent: str) -> list[tuple[str, str]]:
    """The (metric, mode) objectives a sweep's parent run recorded in its `dcad.objectives` tag."""
    import json

    text = client.get_run(parent).data.tags.get("dcad.objectives")
    try:
        return [(o["metric"], o["mode"]) for o in json.loads(text)] if text else []
    except (ValueError, KeyError, TypeError):
        return []


def dominated(a: dict[str, float], b: dict[str, float], objectives: list[tuple[str, str]]) -> bool:
    """Whether `a` is dominated by `b`: no worse on every objective and better on one."""
    strictly = False
    for metric, mode in objectives:
        x, y = (a[metric], b[metric]) if mode == "max" else (-a[metric], -b[metric])
        if y < x:
            return False
        strictly = strictly or y > x
    return strictly


def build_pareto(client, uri: str, parent: str, objectives: list[tuple[str, str]] | None = None,
                 finished_only: bool = True) -> Leaderboard:
    """The children of sweep `parent` (run id or sweep name) on the Pareto front of its objectives
    (of its FINISHED children unless `finished_only=False`)."""
    parent = resolve_parent(client, parent)
    objectives = objectives or sweep_objectives(client, parent)
    if not objectives:
        raise TrackingError(f"run {parent} records no sweep objectives (tag dcad.objectives); is it a sweep's parent run?")
    experiment_id, name = _experiment(client, None, parent)
    metrics = [m for m, _ in objectives]
    filters = [f"tags.mlflow.parentRunId = '{parent}'", *[f"metrics.`{m}` > -1e300" for m in metrics],
               *status_filter(finished_only)]
    runs = client.search_runs([experiment_id], filter_string=" and ".join(filters), max_results=1000)
    values = [{m: r.data.metrics[m] for m in metrics} for r in runs]
    front = [r for r, v in zip(runs, values) if not any(dominated(v, w, objectives) for w in values if w is not v)]
    first, mode = objectives[0]
    front.sort(key=lambda r: r.data.metrics[first], reverse=mode == "max")
    board = Leaderboard(first, mode == "min", name, pareto=True, source=parent_label(client, parent))
    board.metric_keys = [*metrics, *[m for m in SHOWN_METRICS if m not in metrics]]
    board.param_keys = varying_params([r.data.params for r in runs])
    board.rows = [_row(i, run, board, uri) for i, run in enumerate(front, start=1)]
    return board
