"""`dcad promote NAME --run RUN_ID [--alias champion]` and `dcad promote NAME --rollback --alias champion`."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from dcad.cli.console import console, err_console
from dcad.cli.tracking import TRACKING_URI_OPTION
from dcad.platform.gate import DEFAULT_FLOOR, DEFAULT_GATE_METRICS, DEFAULT_TOLERANCE, GateResult


def promote(
    name: str = typer.Argument(..., help="Registered model name (created on first promotion)."),
    run: Optional[str] = typer.Option(None, "--run", help="Run whose logged model becomes the candidate: its id, its name "
                                      "(as the leaderboard shows it) or models:/NAME@ALIAS (the run behind that version)."),
    alias: str = typer.Option("champion", "--alias", help="Alias to move (e.g. champion, challenger)."),
    data: Optional[Path] = typer.Option(None, "--data", help="Evaluation data (default: the run's recorded dataset)."),
    tolerance: float = typer.Option(DEFAULT_TOLERANCE, "--tolerance", min=0.0, help="Largest allowed drop per category."),
    gate_metric: list[str] = typer.Option(list(DEFAULT_GATE_METRICS), "--gate-metric", help="Metric(s) the gate compares."),
    floor: float = typer.Option(DEFAULT_FLOOR, "--floor", min=0.0, max=1.0,
                                help="Least mean of every gate metric the candidate needs, first holder included (0: none)."),
    force: bool = typer.Option(False, "--force", help="Move the alias even if the gate refuses (recorded)."),
    rollback: bool = typer.Option(False, "--rollback", help="Move the alias back to its previous holder."),
    reevaluate: bool = typer.Option(False, "--reevaluate", help="Evaluate the alias holder again even if its metrics on this data are recorded."),
    device: str = typer.Option("auto", help="Device for the gate's evaluations."),
    tracking_uri: Optional[str] = TRACKING_URI_OPTION,
    json_out: bool = typer.Option(False, "--json", help="Print the decision as JSON."),
) -> None:
    """Register a run's model and move an alias to it through the quality gate (or roll the alias back)."""
    from dcad.core.metrics import METRIC_KEYS
    from dcad.platform import registry
    from dcad.platform.errors import GateRefusedError, RegistryError, store_errors
    from dcad.platform.mlflow_store import open_store

    unknown = sorted(set(gate_metric) - set(METRIC_KEYS))
    if unknown:
        raise RegistryError(f"--gate-metric {', '.join(unknown)}: unknown (choose from {', '.join(METRIC_KEYS)})")
    uri, client = open_store(tracking_uri)
    if rollback:
        if run:
            raise RegistryError("--rollback takes no --run")
        with store_errors(f"rollback of {name}@{alias} failed", RegistryError):
            old, new = registry.rollback(client, name, alias)
        console.print(f"{name}@{alias}: rolled back from version {old} to version {new}")
        return
    if not run:
        raise RegistryError("missing --run RUN_ID (or use --rollback)")
    from dcad.platform.evaluation import uri_evaluator

    request = registry.PromotionRequest(name, run, alias, data, tolerance, tuple(gate_metric), force, not reevaluate, floor)
    evaluate = uri_evaluator(uri, device, on_start=lambda u: err_console.print(f"[cyan]▸[/] evaluating {u}"))
    with store_errors(f"promotion of run {run} to {name}@{alias} failed", RegistryError):
        result = registry.promote(client, request, evaluate, log=lambda line: err_console.print(f"[cyan]▸[/] {line}"))
    _report(result, json_out)
    if not result.moved:
        raise GateRefusedError(f"refused: {result.refusal()}; version {result.version} is registered without the alias "
                               "(--force overrides)")


def _report(result, json_out: bool) -> None:
    import json

    if json_out:
        payload = {
            "name": result.name, "alias": result.alias, "version": result.version, "previous": result.previous,
            "decision": result.decision, "moved": result.moved, "data": str(result.data), "notes": result.notes,
            "gate": [r.to_dict() for r in result.gate.rows], "regressions": [r.to_dict() for r in result.gate.regressions],
            "floor": result.gate.floor, "below_floor": result.gate.below_floor,
        }
        console.print_json(json.dumps(payload, allow_nan=True))
        return
    for note in result.notes:
        err_console.print(f"note: {note}")
    if result.gate.has_incumbent:
        console.print(gate_table(result.gate, f"v{result.previous}", f"v{result.version}", only_regressions=not result.moved))
    mean = ", ".join(f"{k} {v:.3f}" for k, v in result.candidate.get("mean", {}).items() if k in result.gate.metrics)
    console.print(f"version {result.version} on {result.data.name}: mean {mean}", highlight=False)
    held = result.gate.has_incumbent
    moved = f"moved from version {result.previous} to {result.version}" if held else f"→ version {result.version}"
    stays = f"stays on version {result.previous}" if held else "stays unset"
    verdict = {
        "first": f"[green]first holder[/]: {result.name}@{result.alias} {moved}",
        "passed": f"[green]gate passed[/]: {result.name}@{result.alias} {moved}",
        "forced": f"[yellow]gate refused, forced[/]: {result.name}@{result.alias} {moved}",
        "refused": f"[red]gate refused[/]: {result.name}@{result.alias} {stays}",
    }[result.decision]
    console.print(verdict)


def gate_table(gate: GateResult, incumbent: str, candidate: str, only_regressions: bool = False) -> Table:
    title = "Regressions" if only_regressions else "Gate"
    table = Table(title=f"{title} (tolerance {gate.tolerance:g}; {', '.join(gate.metrics)})", title_justify="left")
    for col in ("category", "metric", incumbent, candidate, "Δ", ""):
        table.add_column(col, justify="left" if col in ("category", "metric", "") else "right")
    rows = gate.regressions if only_regressions else gate.rows
    for row in rows:
        bad = row.regressed(gate.tolerance)
        delta = "—" if row.delta is None else f"{row.delta:+.4f}"
        cand = "missing" if row.candidate is None else f"{row.candidate:.4f}"
        table.add_row(row.category, row.metric, f"{row.incumbent:.4f}", cand, delta, "[red]regressed[/]" if bad else "ok")
    return table


def register(app: typer.Typer) -> None:
    app.command("promote")(promote)
