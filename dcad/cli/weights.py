"""`dcad weights list`: which backbones have weights usable offline, and from where."""

from __future__ import annotations

import json

import typer
from rich.table import Table

from dcad.cli.console import console

app = typer.Typer(help="Backbone weights available offline.", no_args_is_help=True)


@app.callback()
def _group() -> None:
    """Backbone weights: what dcad can use without a network."""


@app.command("list")
def list_weights(as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table.")) -> None:
    """Show each known backbone, whether its weights are usable offline right now, and their source."""
    from dcad.core.model.backbone import list_backbone_weights

    rows = list_backbone_weights()
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    table = Table(title="Backbone weights (offline)")
    table.add_column("backbone", style="bold")
    table.add_column("offline")
    table.add_column("source")
    for row in rows:
        table.add_row(row["name"], "[green]yes[/]" if row["offline"] else "[red]no[/]", row["source"])
    console.print(table)
