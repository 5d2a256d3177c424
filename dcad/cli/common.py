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

SHORT = {
    "image_auroc": "I-AUROC",
    "pixel_auroc": "P-AUROC",
    "aupro": "AUPRO",
    "image_ap": "I-AP",
    "pixel_ap": "P-AP",
    "image_f1max": "I-F1max",
    "pixel_f1max": "P-F1max",
}


def check_output_dir(path: Path, overwrite: bool, keep: bool = False) -> bool:
    """DcadError unless `path` can be written; whether it holds files that `overwrite` will clear."""
    if path.exists() and not path.is_dir():
        raise DcadError(f"{path}: output path exists and is not a directory")
    full = path.exists() and any(path.iterdir()) and not keep
    if full and not overwrite:
        raise DcadError(f"{path}: output directory exists and is not empty (use --overwrite to replace it)")
    return full


def prepare_output_dir(path: Path, overwrite: bool, keep: bool = False) -> Path:
    """Refuse a non-empty directory unless `overwrite` (which clears it) or `keep` (resume)."""
    if check_output_dir(path, overwrite, keep):
        shutil.rmtree(path)
    path.mkdir(parents=True, exist_ok=True)
    return path


def _fmt(v: float) -> str:
    return "—" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3f}"


def metrics_table(result: dict, title: str = "Test metrics") -> Table:
    from dcad.core.metrics import METRIC_KEYS

    table = Table(title=title, title_justify="left")
    table.add_column("category")
    for key in METRIC_KEYS:
        table.add_column(SHORT[key], justify="right")
    for cat, metrics in result["categories"].items():
        table.add_row(cat, *(_fmt(metrics.get(k)) for k in METRIC_KEYS))
    table.add_row("[bold]mean[/]", *(f"[bold]{_fmt(result['mean'].get(k))}[/]" for k in METRIC_KEYS), end_section=True)
    return table


def defect_table(result: dict, title: str = "Per defect type (each against its category's good images)") -> Table:
    """One row per (category, defect type) of an evaluation made with `track_defect_types`."""
    from dcad.core.metrics.evaluator import DEFECT_METRIC_KEYS

    table = Table(title=title, title_justify="left")
    table.add_column("category")
    table.add_column("defect")
    for key in DEFECT_METRIC_KEYS:
        table.add_column(SHORT[key], justify="right")
    for cat, defects in result.get("defect_types", {}).items():
        for defect, metrics in defects.items():
            table.add_row(cat, defect, *(_fmt(metrics.get(k)) for k in DEFECT_METRIC_KEYS))
    return table


def compact_table(title: str) -> Table:
    """A table without side borders: what fits most columns in 80."""
    from rich import box

    return Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False, padding=(0, 1), min_width=len(title))


def metric_column(table: Table, header: str, **kwargs) -> None:
    """A right-aligned number column whose header wraps at its words and is never cut."""
    table.add_column(header, justify="right", min_width=max(len(w) for w in header.split()), **kwargs)


def short_param(key: str) -> str:
    """`refiner.scheduler.beta_schedule` -> `beta_schedule` (the leaf names what it is)."""
    return key.rsplit(".", 1)[-1]


def short_value(value) -> str:
    """A param as read: floats (also as MLflow's strings) to 4 significant digits, the rest as it is."""
    text = str(value)
    try:
        number = float(text)
    except ValueError:
        return text
    return f"{number:.4g}" if "." in text or "e" in text.lower() else text


def params_table(title: str, rows: list[tuple[str, dict]], keys: list[str], label: str = "#") -> Table | None:
    """One column per param (headed by its leaf name, wrapped at its words), one row per (label, params);
    None when no param differs."""
    from rich.markup import escape

    if len(rows) > 1:  # a column that is the same everywhere says nothing here
        keys = [k for k in keys if len({str(p.get(k, "")) for _, p in rows}) > 1]
    if not keys:
        return None
    rows = [(name, {k: short_value(p.get(k, "")) for k in keys}) for name, p in rows]
    table = compact_table(title)
    table.add_column(label, justify="right" if label == "#" else "left", no_wrap=True)
    for key in keys:
        header = short_param(key).replace("_", " ")
        values = [str(p.get(key, "")) for _, p in rows]
        widest = max([len(w) for w in header.split()] + [min(len(v), 17) for v in values])
        table.add_column(header, overflow="fold", width=widest)
    for name, params in rows:
        table.add_row(escape(name), *(escape(str(params.get(k, ""))) for k in keys))
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
