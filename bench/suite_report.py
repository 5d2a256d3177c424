"""Across-seed summary of a suite run, its JSON file, and markdown tables (also put into README.md)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from dcad.core.json_io import json_safe

QUALITY_KEYS = ("image_auroc", "pixel_auroc", "aupro", "pixel_ap")
SPEED_KEYS = ("test_images", "train_s", "images_per_s", "ms_per_image", "fit_peak_rss_delta_mb", "infer_peak_rss_delta_mb",
              "unet_passes_per_image", "batch_size", "refined_pixel_fraction", "refined_image_fraction")
SUBTLE_DEFECTS = ("faint_scratch", "faint_stain")
GAIN_KEYS = ("pixel_auroc", "aupro", "image_auroc")
README_START, README_END = "<!-- bench:start -->", "<!-- bench:end -->"


def _stats(values: list[float]) -> dict[str, float]:
    finite = [v for v in values if v is not None and not math.isnan(v)]
    if not finite:
        return {"mean": float("nan"), "std": float("nan")}
    return {"mean": float(np.mean(finite)), "std": float(np.std(finite))}


def _collect(runs: list[dict], method: str, path: tuple[str, ...]) -> dict[str, dict[str, list[float]]]:
    """{row: {key: [value per seed]}} from runs[*].methods[method].<path> (a {row: {key: value}} table)."""
    table: dict[str, dict[str, list[float]]] = {}
    for run in runs:
        node: Any = run["methods"][method]
        for part in path:
            node = node[part]
        for row, metrics in node.items():
            for key, value in metrics.items():
                table.setdefault(row, {}).setdefault(key, []).append(value)
    return table


def summarise(doc: dict) -> dict[str, dict]:
    """Per method: mean ± std over seeds of the mean metrics and speed; per category / defect type means."""
    runs, summary = doc["runs"], {}
    for method in doc["methods"]:
        speed = {key: [run["methods"][method]["speed"].get(key) for run in runs] for key in SPEED_KEYS}
        means = {key: [run["methods"][method]["quality"]["mean"][key] for run in runs]
                 for key in runs[0]["methods"][method]["quality"]["mean"]}
        summary[method] = {
            "mean": {key: _stats(v) for key, v in means.items()},
            "categories": {c: {k: _stats(v)["mean"] for k, v in m.items()}
                           for c, m in _collect(runs, method, ("quality", "categories")).items()},
            "defect_types": {d: {k: _stats(v)["mean"] for k, v in m.items()}
                             for d, m in _collect(runs, method, ("quality", "defect_types")).items()},
            "speed": {key: _stats(v) for key, v in speed.items()},
        }
    return summary


def write_json(doc: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(json_safe(doc), indent=1, allow_nan=False) + "\n")
    tmp.replace(path)


# ---- markdown --------------------------------------------------------------------------------------------
def _fmt(stats: dict[str, float] | float | None, digits: int = 3) -> str:
    if isinstance(stats, dict):
        mean, std = stats["mean"], stats["std"]
        if mean is None or math.isnan(mean):
            return "–"
        return f"{mean:.{digits}f} ± {std:.{digits}f}" if std and not math.isnan(std) and std > 0 else f"{mean:.{digits}f}"
    if stats is None or math.isnan(stats):
        return "–"
    return f"{stats:.{digits}f}"


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join([*lines, *("| " + " | ".join(r) + " |" for r in rows)])


def _bold_best(rows: list[list[str]], values: list[list[float]]) -> None:
    """Bold the best (largest) value of each column (columns from 1 on)."""
    for j in range(len(values[0]) if values else 0):
        column = [v[j] for v in values]
        finite = [v for v in column if v is not None and not math.isnan(v)]
        if finite:
            best = max(finite)
            for i, v in enumerate(column):
                if v == best:
                    rows[i][j + 1] = f"**{rows[i][j + 1]}**"


def main_methods(doc: dict) -> list[str]:
    """Every method but the refinement-budget curve's own points (those have their own table)."""
    return [m for m, info in doc["methods"].items() if not info.get("budget_curve")]


def quality_table(doc: dict, summary: dict) -> str:
    header = ["method", "one model", "test images", *QUALITY_KEYS]
    rows, values = [], []
    for method in main_methods(doc):
        info = doc["methods"][method]
        mean = summary[method]["mean"]
        n_test = _fmt(summary[method]["speed"]["test_images"]["mean"], 0)
        rows.append([method, "yes" if info["multi_class"] else "per category", n_test,
                     *(_fmt(mean[k]) for k in QUALITY_KEYS)])
        values.append([float("nan"), float("nan"), *(mean[k]["mean"] for k in QUALITY_KEYS)])
    _bold_best(rows, values)
    return _table(header, rows)


def subset_methods(doc: dict) -> dict[str, int]:
    """Methods scored on only part of the test split (an expensive one): {method: fewest test images in a run}."""
    out = {}
    for method in doc["methods"]:
        scored = [run["methods"][method]["speed"]["test_images"] for run in doc["runs"]]
        if any(n < run["dataset"]["test_images"] for n, run in zip(scored, doc["runs"])):
            out[method] = min(scored)
    return out


def breakdown_methods(doc: dict, section: str) -> list[str]:
    """Per-defect-type tables leave out subset-scored methods: a type has only a few of their images."""
    skip = subset_methods(doc) if section == "defect_types" else {}
    return [m for m in main_methods(doc) if m not in skip]


def _column_names(names: list[str]) -> list[str]:
    """Table headers: subtle defect types in italics."""
    return [f"*{n}*" if n in SUBTLE_DEFECTS else n for n in names]


def breakdown_table(doc: dict, summary: dict, section: str, metric: str) -> str:
    methods = breakdown_methods(doc, section)
    names = sorted({row for m in methods for row in summary[m][section]})
    header = ["method", *_column_names(names)]
    rows, values = [], []
    for method in methods:
        table = summary[method][section]
        got = [table.get(n, {}).get(metric, float("nan")) for n in names]
        rows.append([method, *(_fmt(v) for v in got)])
        values.append(got)
    _bold_best(rows, values)
    return _table(header, rows)


def refinement_gain(summary: dict, full: str = "drdc", base: str = "drdc_base_only") -> dict[str, dict[str, float]]:
    """{defect type: {metric: full − base}}: what the diffusion refinement adds to the base map, per defect type."""
    if full not in summary or base not in summary:
        return {}
    mine, theirs = summary[full]["defect_types"], summary[base]["defect_types"]
    return {d: {k: mine[d][k] - theirs[d][k] for k in GAIN_KEYS} for d in sorted(mine) if d in theirs}


def refinement_gain_table(gain: dict[str, dict[str, float]]) -> str:
    names = list(gain)
    header = ["drdc − drdc_base_only", *_column_names(names)]
    rows = [[key, *(f"{gain[n][key]:+.3f}" for n in names)] for key in GAIN_KEYS]
    return _table(header, rows)


def refinement_sentence(gain: dict[str, dict[str, float]]) -> str:
    by_aupro = sorted(gain, key=lambda d: gain[d]["aupro"], reverse=True)
    helped = [d for d in by_aupro if gain[d]["aupro"] > 0.005]
    hurt = [d for d in by_aupro if gain[d]["aupro"] < -0.005]
    parts = []
    if helped:
        parts.append("refinement raises AUPRO most on " + ", ".join(f"{d} ({gain[d]['aupro']:+.3f})" for d in helped[:3]))
    if hurt:
        parts.append("it lowers AUPRO on " + ", ".join(f"{d} ({gain[d]['aupro']:+.3f})" for d in hurt))
    if not parts:
        return "Refinement changes no defect type's AUPRO by more than 0.005."
    text = "; ".join(parts) + "."
    return text[0].upper() + text[1:]


def defect_counts_line(doc: dict) -> str:
    """'Anomalous test images per seed: cut_paste 22, …' from a method scored on the whole split ('' if unknown)."""
    full = [m for m in breakdown_methods(doc, "defect_types")
            if "defect_images" in doc["runs"][0]["methods"][m]["quality"]]
    if not full:
        return ""
    per_seed = [run["methods"][full[0]]["quality"]["defect_images"] for run in doc["runs"]]
    names = sorted({d for counts in per_seed for d in counts})
    shown = ", ".join(f"{d} {'/'.join(str(c.get(d, 0)) for c in per_seed)}" for d in names)
    return f"Anomalous test images per type (seed {'/'.join(str(r['seed']) for r in doc['runs'])}): {shown}."


def _left_out(doc: dict) -> str:
    skipped = subset_methods(doc)
    return "".join(f"; {m} is left out here: it was scored on {n} test images, too few per type"
                   for m, n in skipped.items())


def speed_table(doc: dict, summary: dict) -> str:
    header = ["method", "train s", "images/s", "ms/image", "batch", "UNet passes/image",
              "peak RSS Δ fit MB", "peak RSS Δ infer MB"]
    rows = []
    for method in main_methods(doc):
        s = summary[method]["speed"]
        rows.append([method, _fmt(s["train_s"], 1), _fmt(s["images_per_s"], 2), _fmt(s["ms_per_image"], 1),
                     _fmt(s["batch_size"]["mean"], 0), _fmt(s["unet_passes_per_image"]["mean"], 0),
                     _fmt(s["fit_peak_rss_delta_mb"]["mean"], 0), _fmt(s["infer_peak_rss_delta_mb"]["mean"], 0)])
    return _table(header, rows)


def budget_rows(doc: dict, summary: dict) -> list[str]:
    """DRDC methods that refine (or not) a measured share of pixels, from least to most refined."""
    rows = [m for m in doc["methods"] if summary[m]["speed"]["refined_pixel_fraction"]["mean"] is not None
            and not math.isnan(summary[m]["speed"]["refined_pixel_fraction"]["mean"])
            and m not in ("drdc_refine_only", "reverse_diffusion")]
    return sorted(rows, key=lambda m: (summary[m]["speed"]["refined_pixel_fraction"]["mean"],
                                       summary[m]["speed"]["ms_per_image"]["mean"]))


def budget_table(doc: dict, summary: dict) -> str:
    rows = budget_rows(doc, summary)
    if len(rows) < 2:
        return ""
    base = summary.get("drdc_base_only", {}).get("speed", {}).get("ms_per_image", {}).get("mean", float("nan"))
    header = ["method", "pixels refined", "images refined", "ms/image", "× base", *QUALITY_KEYS]
    out = []
    for method in rows:
        s, mean = summary[method]["speed"], summary[method]["mean"]
        ms = s["ms_per_image"]["mean"]
        out.append([method, f"{100 * s['refined_pixel_fraction']['mean']:.0f} %",
                    f"{100 * s['refined_image_fraction']['mean']:.0f} %", _fmt(s["ms_per_image"], 1),
                    _fmt(ms / base, 1) if base and not math.isnan(base) else "–", *(_fmt(mean[k]) for k in QUALITY_KEYS)])
    return _table(header, out)


def speed_targets(summary: dict) -> str:
    """The default model's cost against its base branch, PaDiM and the full reverse chain, in words."""
    if "drdc" not in summary or "drdc_base_only" not in summary:
        return ""
    ms = {m: summary[m]["speed"]["ms_per_image"]["mean"] for m in summary}
    parts = [f"drdc takes {ms['drdc']:.1f} ms/image, {ms['drdc'] / ms['drdc_base_only']:.1f}× its base branch"]
    if "drdc_refine_all" in ms:
        parts.append(f"{ms['drdc_refine_all'] / ms['drdc']:.1f}× less than refining every pixel")
    if "anomalib_padim" in ms:
        parts.append(f"{ms['anomalib_padim'] / ms['drdc']:.2f}× PaDiM's images/s")
    if "reverse_diffusion" in ms:
        parts.append(f"full reverse diffusion takes {ms['reverse_diffusion'] / ms['drdc']:.0f}× as long")
    return "; ".join(parts) + "."


def _gap(winner: dict[str, float], loser: dict[str, float]) -> str:
    """'by 0.012' and whether that is more than the seed-to-seed spread of either."""
    gap = winner["mean"] - loser["mean"]
    spread = max(winner.get("std") or 0.0, loser.get("std") or 0.0)
    if spread > 0 and not math.isnan(spread):
        return f"by {gap:.3f} ({'more' if gap > spread else 'less'} than the seed spread ±{spread:.3f})"
    return f"by {gap:.3f}"


def losses(doc: dict, summary: dict, reference: str = "drdc") -> list[str]:
    """Plain sentences: where another method beats DRDC (mean metrics and subtle defect types)."""
    if reference not in summary:
        return []
    out = []
    ref = summary[reference]
    for key in QUALITY_KEYS:
        better = sorted((m for m in main_methods(doc) if m != reference
                         and summary[m]["mean"][key]["mean"] > ref["mean"][key]["mean"]),
                        key=lambda m: -summary[m]["mean"][key]["mean"])
        if better:
            best = summary[better[0]]["mean"][key]
            others = f" (also {', '.join(better[1:])})" if better[1:] else ""
            out.append(f"mean {key}: {better[0]} {_fmt(best['mean'])} vs {reference} {_fmt(ref['mean'][key]['mean'])}, "
                       f"{_gap(best, ref['mean'][key])}{others}")
    for defect in SUBTLE_DEFECTS:
        if defect in ref["defect_types"]:
            mine = ref["defect_types"][defect]["pixel_auroc"]
            better = [m for m in breakdown_methods(doc, "defect_types") if m != reference
                      and summary[m]["defect_types"].get(defect, {}).get("pixel_auroc", -1) > mine]
            if better:
                shown = ", ".join(f"{m} {_fmt(summary[m]['defect_types'][defect]['pixel_auroc'])}" for m in better)
                out.append(f"{defect} pixel AUROC: {shown} vs {reference} {_fmt(mine)}")
    return out


def markdown(doc: dict, summary: dict, figures: dict[str, str]) -> str:
    runs = doc["runs"]
    ds = runs[0]["dataset"]
    m = doc["machine"]
    parts = [
        f"Generated by `python -m bench` on {doc['created']} ({'quick' if doc['quick'] else 'full'} run, "
        f"profile `{doc['profile']}`, seeds {', '.join(map(str, doc['seeds']))}; "
        f"{m['cpu_count']} CPUs, {m['torch_threads']} torch threads, torch {m['torch']}; wall {doc['wall_s'] / 60:.1f} min). "
        f"Data: `dcad data synth --seed S` at {ds['size']} px, {len(ds['categories'])} categories, "
        f"{ds['train_images']} train / {ds['val_images']} validation / {ds['test_images']} test images per seed. "
        "All methods use the profile's backbone and `AnomalyEvaluator`; values are mean ± std over seeds.",
        "**Quality** (unweighted mean over categories; best in bold)", quality_table(doc, summary),
        "**Pixel AUROC per category**", breakdown_table(doc, summary, "categories", "pixel_auroc"),
        "**Pixel AUROC per defect type** (that type's test images plus all good ones; subtle types in italics"
        f"{_left_out(doc)})",
        *filter(None, [defect_counts_line(doc)]),
        breakdown_table(doc, summary, "defect_types", "pixel_auroc"),
        "**AUPRO per defect type**", breakdown_table(doc, summary, "defect_types", "aupro"),
        "**Image AUROC per defect type** (that type vs good)", breakdown_table(doc, summary, "defect_types", "image_auroc"),
    ]
    gain = refinement_gain(summary)
    if gain:
        parts += ["**What refinement adds, per defect type** (full DRDC minus its base branch alone; same weights)",
                  refinement_gain_table(gain), refinement_sentence(gain)]
    parts += [
        "**Speed and memory** (inference over the test split after a one-image warm-up; peak RSS sampled every "
        "10 ms, minus RSS at the start; the DRDC variants and reverse diffusion share one trained model, "
        "so they report its training)", speed_table(doc, summary),
    ]
    budget = budget_table(doc, summary)
    if budget:
        parts += ["**Refinement budget: quality against cost** (one trained model; each budget re-calibrated on "
                  "validation; pixels/images refined are shares of the test split; × base is ms/image over "
                  "drdc_base_only's in the same run)", budget, *filter(None, [speed_targets(summary)])]
    ratio = [r["refiner_vs_reverse_diffusion"] for r in runs if r.get("refiner_vs_reverse_diffusion")]
    if ratio:
        parts.append(
            f"**Refinement vs full reverse diffusion**: DRDC needs {ratio[0]['drdc_unet_passes']} UNet passes per image, "
            f"the reverse chain {ratio[0]['reverse_unet_passes']}; it takes "
            f"{np.mean([r['time_ratio'] for r in ratio]):.1f}× the time of the full DRDC model per image.")
    lost = losses(doc, summary)
    if lost:
        parts.append("**Where DRDC loses**:\n\n" + "\n".join(f"- {line}" for line in lost))
    parts += [f"![{title}]({path})" for title, path in figures.items()]
    return "\n\n".join(parts) + "\n"


def rewrite_readme(readme: Path, body: str) -> None:
    """Replace the text between the benchmark markers (created under '## Benchmarks' if absent)."""
    text = readme.read_text()
    block = f"{README_START}\n{body.rstrip()}\n{README_END}"
    if README_START in text and README_END in text:
        head, rest = text.split(README_START, 1)
        _, tail = rest.split(README_END, 1)
        text = head + block + tail
    else:
        text = _insert_under_heading(text, block)
    readme.write_text(text)


def _insert_under_heading(text: str, block: str) -> str:
    lines = text.splitlines(keepends=True)
    heading = next((i for i, line in enumerate(lines) if line.strip() == "## Benchmarks"), None)
    if heading is None:
        return text.rstrip("\n") + "\n\n## Benchmarks\n\n" + block + "\n"
    end = next((i for i in range(heading + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    section = "".join(lines[heading:end]).rstrip("\n")
    tail = "".join(lines[end:])
    return "".join(lines[:heading]) + section + "\n\n" + block + "\n" + ("\n" + tail if tail else "")
