"""`dcad leaderboard`: runs ranked by a metric, with the params that differ between them."""

from __future__ import annotations

import json
from typing import Optional

import typer
from rich.table import Table

from dcad.cli.common import SHORT, compact_table, metric_column, params_table
from dcad.cli.console import console
from dcad.cli.tracking import TRACKING_URI_OPTION
from dcad.platform.leaderboard import DEFAULT_METRIC


def leaderboard(
    experiment: Optional[str] = typer.Option(None, "--experiment", "-e", help="Experiment (default: dcad)."),
    parent: Optional[str] = typer.Option(None, "--parent", help="Only the child runs of this run or of the sweep of this name."),
    metric: str = typer.Option(DEFAULT_METRIC, "--metric", "-m", help="Metric to rank by."),
    top: int = typer.Option(10, "--top", "-k", help="Number of runs shown."),
    ascending: Optional[bool] = typer.Option(None, "--ascending/--descending", help="Order (default: by the metric's name)."),
    tracking_uri: Optional[str] = TRACKING_URI_OPTION,
    json_out: bool = typer.Option(False, "--json", help="Print JSON."),
    pareto: bool = typer.Option(False, "--pareto", help="With --parent SWEEP: only the trials on the Pareto front of its objectives."),
    unfinished: bool = typer.Option(False, "--unfinished", help="Also rank runs that did not finish (running, failed, killed)."),
) -> None:
    """Rank tracked runs by a metric."""
    from dcad.platform.errors import TrackingError, store_errors
    from dcad.platform.leaderboard import build_leaderboard, build_pareto
    from dcad.platform.mlflow_store import open_store

    if pareto and not parent:
        raise TrackingError("--pareto needs --parent SWEEP (a sweep's name or parent run id)")
    uri, client = open_store(tracking_uri)
    with store_errors("searching runs failed"):
        if pareto:
            board = build_pareto(client, uri, parent, finished_only=not unfinished)
        else:
            board = build_leaderboard(client, uri, experiment, parent, metric, top, ascending, finished_only=not unfinished)
    if json_out:
        console.print_json(json.dumps(board.to_dict(), allow_nan=True))
        return
    if not board.rows:
        console.print(f"no runs with metric '{metric}' in experiment '{board.experiment}'")
        return
    for table in leaderboard_tables(board, console.width):
        console.print(table)


def leaderboard_tables(board, width: int | None = None) -> list[Table]:
    """The ranking (run names and metrics), then the params that differ between the runs: each readable at 80
    columns. `dcad promote NAME --run RUN` takes the run name shown (or the id `--json` gives)."""
    order = "↑" if board.ascending else "↓"
    what = "Pareto front" if board.pareto else "Leaderboard"
    statuses = {r.status for r in board.rows}
    same = next(iter(statuses)) if len(statuses) == 1 else None
    title = f"{what}: {board.source or board.experiment}, by {board.metric} {order}" + (f" (all {same})" if same else "")
    keys = list(board.metric_keys)
    ranking = _ranking(board, title, same, keys)
    while width and len(keys) > 2 and _min_width(ranking) > width:  # the last metrics give way, not the names
        keys.pop()
        ranking = _ranking(board, title, same, keys)
    params = params_table("Params that differ", [(str(r.rank), r.params) for r in board.rows], board.param_keys)
    return [ranking] + ([params] if params is not None and len(board.rows) > 1 else [])


def _min_width(table: Table) -> int:
    from rich.console import Console
    from rich.measure import Measurement

    probe = Console(width=10_000)
    return Measurement.get(probe, probe.options, table).minimum


def _ranking(board, title: str, same: str | None, keys: list[str]) -> Table:
    ranking = compact_table(title)
    ranking.add_column("#", justify="right")
    ranking.add_column("run", no_wrap=True)
    if same is None:
        ranking.add_column("status")
    for key in keys:
        metric_column(ranking, metric_header(key), style="bold" if key == board.metric else None)
    for r in board.rows:
        cells = [str(r.rank), r.run_name or r.run_id] + ([] if same else [r.status])
        ranking.add_row(*cells, *(_cell(r.metrics, k, k == board.metric) for k in keys))
    return ranking


def _cell(metrics: dict, key: str, ranked_by: bool) -> str:
    """Three decimals; four for the metric the board is ranked by, so that its order is visible."""
    if key not in metrics:
        return "—"
    return f"{metrics[key]:.4f}" if ranked_by else f"{metrics[key]:.3f}"


def metric_header(key: str) -> str:
    """`test_image_auroc` -> `I-AUROC`, `val_pixel_auroc` -> `val P-AUROC`, `ms_per_image` -> `ms per image`."""
    for prefix, label in (("test_", ""), ("val_", "val ")):
        if key.startswith(prefix) and key[len(prefix):] in SHORT:
            return label + SHORT[key[len(prefix):]]
    return key.replace("_", " ")  # headers wrap at spaces


def register(app: typer.Typer) -> None:
    app.command("leaderboard")(leaderboard)
