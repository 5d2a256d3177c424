"""`dcad data synth|check`."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from dcad.cli.console import console, err_console
from dcad.core.errors import DatasetError

app = typer.Typer(help="Synthesise and validate datasets.", no_args_is_help=True)

LAYOUT_CHOICES = ("auto", "mvtec", "visa", "btad", "folder")


def _progress() -> Progress:
    return Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        console=err_console, transient=True,
    )


def _print_json(data: dict) -> None:
    console.out(json.dumps(data, indent=2), highlight=False)


def _split_names(text: str | None) -> list[str] | None:
    if text is None:
        return None
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise DatasetError("--categories: give at least one category name (comma-separated)")
    return names


@app.command()
def synth(
    out: Path = typer.Argument(..., help="Output directory (must be empty, or use --overwrite)."),
    seed: int = typer.Option(0, "--seed", min=0, help="Random seed: the same arguments give byte-identical files."),
    size: int = typer.Option(128, "--size", help="Image side in pixels."),
    categories: str | None = typer.Option(None, "--categories", help="Comma-separated categories (default: all)."),
    train: int = typer.Option(40, "--train", help="Normal train images per category."),
    test: int = typer.Option(30, "--test", help="Test images per category (about 1/3 good)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a previous synthetic dataset in OUT."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
) -> None:
    """Write the synthetic MVTec-layout benchmark (textures and objects with exact defect masks)."""
    from dcad.core.data.synth import synthesize

    names = _split_names(categories)
    with _progress() as bar:
        task = bar.add_task("synthesising", total=None)

        def report(category: str, done: int, total: int) -> None:
            bar.update(task, completed=done, total=total, description=f"synthesising {category}")

        summary = synthesize(out, seed=seed, size=size, categories=names, n_train=train, n_test=test,
                             overwrite=overwrite, progress=report)
    if as_json:
        _print_json(summary)
        return
    table = Table(title=f"synthetic dataset {out} (seed {seed}, {size} px)")
    for col in ("category", "kind", "train", "test good", "test defects"):
        table.add_column(col, justify="right" if col in ("train", "test good") else "left")
    for name, entry in summary["categories"].items():
        defects = ", ".join(f"{k} {v}" for k, v in entry["test"].items() if k != "good")
        table.add_row(name, entry["kind"], str(entry["train"]), str(entry["test"].get("good", 0)), defects)
    console.print(table)
    console.print(f"wrote {summary['images']} images in {summary['seconds']:.1f} s")


@app.command()
def check(
    directory: Path = typer.Argument(..., metavar="DIR", help="Dataset root."),
    layout: str = typer.Option("auto", "--layout", help=f"One of {', '.join(LAYOUT_CHOICES)}."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
) -> None:
    """Decode every image and mask of a dataset and summarise it; exit 2 naming the first bad file."""
    from dcad.core.data.check import check_dataset

    with _progress() as bar:
        task = bar.add_task("checking", total=None)
        summary = check_dataset(
            directory, layout, progress=lambda done, total: bar.update(task, completed=done, total=total)
        )
    if as_json:
        _print_json(summary)
        return
    console.print(_check_table(summary))
    console.print(_defect_table(summary))
    for name, entry in summary["categories"].items():
        if entry["empty_masks"]:
            count = entry["empty_masks"]
            err_console.print(f"[yellow]warning:[/] {name}: {count} anomalous image(s) with an empty mask")


def _check_table(summary: dict) -> Table:
    table = Table(title=f"{summary['root']} ({summary['layout']})", caption=f"digest {summary['digest'][:16]}")
    for col in ("category", "train", "test good", "test anomalous", "defect types", "mask coverage", "size"):
        table.add_column(col, justify="left" if col in ("category", "size") else "right")
    for name, entry in summary["categories"].items():
        test = entry["test"]
        anomalous = sum(v for k, v in test.items() if k != "good")
        n_types = len(test) - ("good" in test)
        table.add_row(name, str(entry["train"]), str(test.get("good", 0)), str(anomalous), str(n_types),
                      f"{100 * entry['mask_coverage']:.2f} %", ", ".join(entry["sizes"]))
    totals = summary["totals"]
    table.add_section()
    table.add_row(f"total ({totals['categories']})", str(totals["train"]), str(totals["test_good"]),
                  str(totals["test_anomalous"]), "", "", "")
    return table


def _defect_table(summary: dict) -> Table:
    """Test images per defect type (rows) and category (columns)."""
    categories = summary["categories"]
    defects = sorted({k for entry in categories.values() for k in entry["test"] if k != "good"})
    table = Table(title="test images per defect type")
    table.add_column("defect type")
    for name in categories:
        table.add_column(name, justify="right")
    for defect in defects:
        table.add_row(defect, *(str(entry["test"].get(defect, "")) for entry in categories.values()))
    return table
