"""`dcad leaderboard`: runs ranked by a metric, with the params that differ between them."""

from __future__ import annotations

import json
from typing import Optional

import typer
from rich.table import Table

from dcad.cli.common import SHORT
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
) -> None:
    """Rank tracked runs by a metric."""
    from dcad.platform.errors import TrackingError, store_errors
    from dcad.platform.leaderboard import build_leaderboard, build_pareto
    from dcad.platform.store import open_store

    if pareto and not parent:
        raise TrackingError("--pareto needs --parent SWEEP (a sweep's name or parent run id)")
    uri, client = open_store(tracking_uri)
    with store_errors("searching runs failed"):
        if pareto:
            board = build_pareto(client, uri, parent)
        else:
            board = build_leaderboard(client, uri, experiment, parent, metric, top, ascending)
    if json_out:
        console.print_json(json.dumps(board.to_dict(), allow_nan=True))
        return
    if not board.rows:
        console.print(f"no runs with metric '{metric}' in experiment '{board.experiment}'")
        return
    console.print(leaderboard_table(board))


def leaderboard_table(board) -> Table:
    order = "↑" if board.ascending else "↓"
    what = "Pareto front" if board.pareto else "Leaderboard"
    table = Table(title=f"{what}: {board.experiment}, by {board.metric} {order}", title_justify="left")
    table.add_column("#", justify="right")
    table.add_column("run", no_wrap=True)
    table.add_column("status")
    for key in board.param_keys:
        table.add_column(key, overflow="fold")
    for key in board.metric_keys:
        table.add_column(metric_header(key), justify="right", style="bold" if key == board.metric else None)
    with_links = any(r.link for r in board.rows)
    if with_links:
        table.add_column("link")
    for r in board.rows:
        cells = [str(r.rank), f"{r.run_name} {r.run_id[:8]}", r.status]
        cells += [r.params.get(k, "") for k in board.param_keys]
        cells += [f"{r.metrics[k]:.4f}" if k in r.metrics else "—" for k in board.metric_keys]
        if with_links:
            cells.append(f"[link={r.link}]{r.link}[/link]" if r.link else "")
        table.add_row(*cells)
    return table


def metric_header(key: str) -> str:
    """`test_image_auroc` -> `I-AUROC`, `val_pixel_auroc` -> `val P-AUROC`; other keys as they are."""
    for prefix, label in (("test_", ""), ("val_", "val ")):
        if key.startswith(prefix) and key[len(prefix):] in SHORT:
            return label + SHORT[key[len(prefix):]]
    return key


def register(app: typer.Typer) -> None:
    app.command("leaderboard")(leaderboard)
