"""`python -m bench`: DRDC against baselines on the synthetic benchmark, quality and speed, one command.

    python -m bench                       # full suite: cpu profile, seeds 0 and 1 (tens of minutes on 2 cores)
    python -m bench --quick               # CI smoke run: tiny profile, small data, seed 0 (≤ 90 s)
    python -m bench --seeds 0 --methods drdc,anomalib_patchcore --out /tmp/bench
    python -m bench --report-only         # re-render tables, quality plot and README from OUT/suite.json

Writes OUT/suite.json, OUT/suite.md, OUT/suite_quality_latency.png and OUT/suite_heatmaps.png, and (full
runs) the README.md section between `<!-- bench:start -->` and `<!-- bench:end -->`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

from bench.methods import METHOD_NAMES, MethodOptions
from bench.suite import SCHEMA, SuiteOptions, run_suite
from bench.suite_data import SynthSpec
from bench.suite_plots import heatmap_grid, quality_latency
from bench.suite_report import budget_rows, markdown, rewrite_readme, summarise, write_json
from dcad.core.errors import DcadError

QUICK_CATEGORIES = ("brick", "hex_nut")
QUICK_OVERRIDES = [
    "train.base.epochs=2", "train.base.iters_per_epoch=30",
    "train.refiner.epochs=1", "train.refiner.iters_per_epoch=10", "train.validate_refiner=false",
]
RESULT_FILES = {"json": "suite.json", "markdown": "suite.md",
                "quality_latency": "suite_quality_latency.png", "heatmaps": "suite_heatmaps.png"}


def _int_list(text: str) -> list[int]:
    try:
        return [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got '{text}'") from None


def _methods(text: str) -> list[str]:
    names = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [n for n in names if n not in METHOD_NAMES]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown method(s) {unknown or '(none)'}; choose from {', '.join(METHOD_NAMES)}")
    return names


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny profile, 2 categories, 12 train / 8 test images, seed 0")
    p.add_argument("--seeds", type=_int_list, help="dataset and training seeds (default 0,1; quick: 0)")
    p.add_argument("--methods", type=_methods, default=list(METHOD_NAMES), help=f"subset of {','.join(METHOD_NAMES)}")
    p.add_argument("--out", type=Path, help="results folder (default bench/results; quick: .dcad/bench-quick)")
    p.add_argument("--profile", choices=("tiny", "cpu", "paper"), help="DRDC profile (default cpu; quick: tiny)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="config override for every method's config (repeatable)")
    p.add_argument("--categories", help="comma-separated synthetic categories (default all; quick: brick,hex_nut)")
    p.add_argument("--train", type=int, help="normal train images per category (default 40; quick: 12)")
    p.add_argument("--test", type=int, help="test images per category (default 30; quick: 8)")
    p.add_argument("--synth-size", type=int, help="synthetic image side (default: the profile's image size)")
    p.add_argument("--cache", type=Path, default=Path(".dcad/bench-data"), help="where synthetic datasets are kept")
    p.add_argument("--batch-size", type=int, default=32, help="inference batch cap shared by all methods")
    p.add_argument("--reverse-steps", type=int, help="DDIM steps of reverse_diffusion (default 50; quick: 5)")
    p.add_argument("--reverse-images", type=int, default=24,
                   help="reverse_diffusion is evaluated on this many evenly spaced test images (0: all)")
    p.add_argument("--ae-iters", type=int, help="autoencoder training iterations (default 500; quick: 30)")
    p.add_argument("--stfpm-iters", type=int, help="anomalib_stfpm student training iterations, batch 16 "
                   "(default 100; quick: 10)")
    p.add_argument("--drdc-model", type=Path, help="evaluate this model directory (trained by `dcad train` on the "
                   "same synthetic data; one seed) instead of training DRDC; its config replaces --profile")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice; quick: 1, which is "
                   "far faster than 2 when other work shares the cores)")
    p.add_argument("--readme", type=Path, default=Path("README.md"), help="README whose benchmark section is rewritten")
    p.add_argument("--no-readme", action="store_true", help="leave README.md alone (always so with --quick)")
    p.add_argument("--report-only", action="store_true", help="run nothing: re-render suite.md, the quality plot "
                   "and the README section from OUT/suite.json (the heatmap figure is kept as it is)")
    return p


def results_dir(args: argparse.Namespace) -> Path:
    return args.out or Path(".dcad/bench-quick" if args.quick else "bench/results")


def options_from(args: argparse.Namespace) -> SuiteOptions:
    quick = args.quick
    categories = tuple(args.categories.split(",")) if args.categories else (QUICK_CATEGORIES if quick else None)
    synth = SynthSpec(args.synth_size, args.train or (12 if quick else 40), args.test or (8 if quick else 30), categories)
    model = args.drdc_model
    if model is not None and len(args.seeds or [0, 1]) != 1:
        raise DcadError("--drdc-model: a model is trained on one dataset; give its seed with --seeds S")
    return SuiteOptions(
        profile=f"model {model}" if model else args.profile or ("tiny" if quick else "cpu"),
        config_path=model / "config.yaml" if model else None,
        seeds=args.seeds or ([0] if quick else [0, 1]),
        methods=args.methods,
        out=results_dir(args),
        cache=args.cache,
        synth=synth,
        overrides=(QUICK_OVERRIDES if quick else []) + args.overrides,
        method_options=MethodOptions(
            autoencoder_iterations=args.ae_iters or (30 if quick else 500),
            reverse_steps=args.reverse_steps or (5 if quick else 50),
            reverse_max_images=args.reverse_images or None,
            drdc_model=args.drdc_model,
            stfpm_iterations=args.stfpm_iters if args.stfpm_iters is not None else (10 if quick else 100),
        ),
        batch_cap=args.batch_size,
        quick=quick,
    )


def write_results(doc: dict, samples: dict | None, out: Path, readme: Path | None) -> None:
    """suite.json, the figures (the heatmaps only when `samples` are given), suite.md and the README section."""
    doc["summary"] = summarise(doc)
    write_json(doc, out / RESULT_FILES["json"])
    quality_latency(doc["summary"], out / RESULT_FILES["quality_latency"], budget_rows(doc, doc["summary"]))
    if samples is not None:
        heatmap_grid(samples, out / RESULT_FILES["heatmaps"])
    local = {"quality against latency": RESULT_FILES["quality_latency"], "heatmaps": RESULT_FILES["heatmaps"]}
    (out / RESULT_FILES["markdown"]).write_text(markdown(doc, doc["summary"], local))
    if readme is not None:
        base = readme.resolve().parent
        linked = {title: os.path.relpath(out.resolve() / name, base) for title, name in local.items()}
        rewrite_readme(readme, markdown(doc, doc["summary"], linked))


def read_results(path: Path) -> dict:
    """A suite.json written by an earlier run (schema checked)."""
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        raise DcadError(f"{path}: no results here; run `python -m bench` first") from None
    except (OSError, ValueError) as err:
        raise DcadError(f"{path}: not readable as suite results ({err})") from None
    if not isinstance(doc, dict) or doc.get("schema") != SCHEMA or not doc.get("runs"):
        raise DcadError(f"{path}: not a {SCHEMA} results file with at least one run")
    return doc


def report_only(args: argparse.Namespace) -> int:
    out = results_dir(args)
    doc = read_results(out / RESULT_FILES["json"])
    readme = None if doc.get("quick") or args.no_readme else args.readme
    write_results(doc, None, out, readme)
    print(f"re-rendered {out / RESULT_FILES['markdown']}" + (f" and {readme}" if readme else ""))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        if args.report_only:
            return report_only(args)
        options = options_from(args)
    except DcadError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    threads_before = torch.get_num_threads()
    torch.set_num_threads(args.threads or (1 if args.quick else threads_before))
    try:
        doc, samples = run_suite(options, log=lambda line: print(line, flush=True))
        write_results(doc, samples, options.out, None if options.quick or args.no_readme else args.readme)
    except DcadError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    finally:
        torch.set_num_threads(threads_before)
    print(f"wrote {options.out / RESULT_FILES['json']} ({doc['wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
