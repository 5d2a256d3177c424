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

    def to_dict(self) -> dict:
        return {
            "metric": self.metric,
            "order": "ascending" if self.ascending else "descending",
            "experiment": self.experiment,
            "runs": [r.to_dict() for r in self.rows],
        }


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
) -> Leaderboard:
    """The `top` runs of `experiment` (or the children of run `parent`) that have `metric`, best first."""
    if top < 1:
        raise TrackingError("--top must be at least 1")
    ascending = lower_is_better(metric) if ascending is None else ascending
    experiment_id, name = _experiment(client, experiment, parent)
    filters = [f"metrics.`{metric}` > -1e300"]  # only runs that logged the metric
    if parent:
        filters.append(f"tags.mlflow.parentRunId = '{parent}'")
    runs = client.search_runs(
        [experiment_id],
        filter_string=" and ".join(filters),
        order_by=[f"metrics.`{metric}` {'ASC' if ascending else 'DESC'}", "attributes.start_time DESC"],
        max_results=top,
    )
    board = Leaderboard(metric, ascending, name)
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
