"""Helpers shared by CLI verbs: output directories, progress bars, metric tables, JSON files."""

from __future__ import annotations

import math
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from dcad.cli.console import err_console
from dcad.core.errors import DcadError
from dcad.core.json_io import json_safe, write_json  # noqa: F401  (re-exported for the commands)
from dcad.core.metrics import METRIC_KEYS

SHORT = {
    "image_auroc": "I-AUROC",
    "pixel_auroc": "P-AUROC",
    "aupro": "AUPRO",
    "image_ap": "I-AP",
    "pixel_ap": "P-AP",
    "image_f1max": "I-F1max",
    "pixel_f1max": "P-F1max",
}


def prepare_output_dir(path: Path, overwrite: bool, keep: bool = False) -> Path:
    """Refuse a non-empty directory unless `overwrite` (which clears it) or `keep` (resume)."""
    if path.exists() and not path.is_dir():
        raise DcadError(f"{path}: output path exists and is not a directory")
    if path.exists() and any(path.iterdir()) and not keep:
        if not overwrite:
            raise DcadError(f"{path}: output directory exists and is not empty (use --overwrite to replace it)")
        shutil.rmtree(path)
    path.mkdir(parents=True, exist_ok=True)
    return path


def _fmt(v: float) -> str:
    return "—" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3f}"


def metrics_table(result: dict, title: str = "Test metrics") -> Table:
    table = Table(title=title, title_justify="left")
    table.add_column("category")
    for key in METRIC_KEYS:
        table.add_column(SHORT[key], justify="right")
    for cat, metrics in result["categories"].items():
        table.add_row(cat, *(_fmt(metrics.get(k)) for k in METRIC_KEYS))
    table.add_row("[bold]mean[/]", *(f"[bold]{_fmt(result['mean'].get(k))}[/]" for k in METRIC_KEYS), end_section=True)
    return table


@contextmanager
def progress_bar() -> Iterator[Progress]:
    with Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=err_console,
        transient=False,
    ) as progress:
        yield progress
