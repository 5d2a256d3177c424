"""`dcad models list` and `dcad models show NAME`: versions, aliases, gate results and metrics."""

from __future__ import annotations

import json
from typing import Optional

import typer
from rich.table import Table

from dcad.cli.console import console
from dcad.cli.tracking import TRACKING_URI_OPTION

app = typer.Typer(help="Registered models: versions, aliases and metrics.", no_args_is_help=True)

SHOWN = ("image_auroc", "pixel_auroc", "aupro")
HISTORY_SHOWN = 10


@app.command("list")
def list_cmd(
    tracking_uri: Optional[str] = TRACKING_URI_OPTION,
    json_out: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Every registered model with its number of versions and its aliases."""
    from dcad.platform.registry import list_models

    rows = _read(tracking_uri, "listing registered models failed", list_models)
    if json_out:
        console.print_json(json.dumps(rows))
        return
    table = Table(title="Registered models", title_justify="left")
    for col in ("name", "versions", "latest", "aliases", "updated"):
        table.add_column(col)
    for r in rows:
        aliases = ", ".join(f"{a}→v{v}" for a, v in sorted(r["aliases"].items())) or "—"
        table.add_row(r["name"], str(r["versions"]), str(r["latest"] or "—"), aliases, r["updated"] or "")
    console.print(table if rows else "no registered models")


@app.command("show")
def show_cmd(
    name: str = typer.Argument(..., help="Registered model name."),
    tracking_uri: Optional[str] = TRACKING_URI_OPTION,
    json_out: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """The versions of a model: aliases, source run, gate decisions, metrics; and each alias's history."""
    from dcad.platform.registry import show_model

    info = _read(tracking_uri, f"reading registered model '{name}' failed", lambda client: show_model(client, name))
    if json_out:
        console.print_json(json.dumps(info, allow_nan=True))
        return
    console.print(versions_table(info))
    for alias, events in info["log"].items():
        current = info["aliases"].get(alias)
        console.print(f"[bold]{alias}[/]: now {'v' + current if current else 'unset'}; history:")
        for e in events[-HISTORY_SHOWN:]:
            console.print(f"  {e['at']}  {_event_text(e)}  by {e['by']}")


def _read(tracking_uri: str | None, failure: str, view):
    """`view(client)` on the registry at `tracking_uri`, a store failure as one line starting with `failure`."""
    from dcad.platform.errors import store_errors
    from dcad.platform.mlflow_store import open_store

    _, client = open_store(tracking_uri)
    with store_errors(failure):
        return view(client)


def versions_table(info: dict) -> Table:
    table = Table(title=f"{info['name']}", title_justify="left")
    for col in ("version", "aliases", "source run", "sweep", *SHOWN, "gate", "by", "at"):
        table.add_column(col, justify="right" if col in SHOWN else "left")
    for v in info["versions"]:
        tags = v["tags"]
        gates = _gates(tags)
        table.add_row(
            v["version"],
            ", ".join(v["aliases"]) or "",
            (v["run_id"] or "")[:12],
            (tags.get("dcad.sweep") or "")[:12],
            *(f"{v['metrics'][k]:.3f}" if k in v["metrics"] else "—" for k in SHOWN),
            "; ".join(f"{a}: {g.get('result', '?')}{', rolled back' if 'rolled_back' in g else ''}" for a, g in gates.items()),
            "; ".join(sorted({g.get("by", "") for g in gates.values()})),
            "; ".join(sorted({g.get("at", "") for g in gates.values()})),
        )
    return table


def _event_text(event: dict) -> str:
    version, previous = event["version"], event.get("from")
    if event["event"] == "refused":
        return f"refused   v{version} (stayed on v{previous})"
    return f"{event['event']:<9} → v{version}" + (f" (from v{previous})" if previous else "")


def _gates(tags: dict) -> dict[str, dict[str, str]]:
    """{alias: {result, by, at, ...}} from the dcad.gate.<alias>.<field> tags."""
    gates: dict[str, dict[str, str]] = {}
    for key, value in tags.items():
        parts = key.split(".")
        if len(parts) == 4 and parts[:2] == ["dcad", "gate"]:
            gates.setdefault(parts[2], {})[parts[3]] = value
    return gates
