"""The benchmark suite: every method on the same data, backbone and machine; quality, speed and memory.

For each seed: synthesise the dataset (`dcad data synth --seed S`, cached), build the leak-free splits,
fit every method on the normal training images, time its inference over the test split and evaluate
its maps with `AnomalyEvaluator` (per category, per defect type). Results go to `OUT/suite.json`,
plots and a markdown summary next to it, and (full runs) the README's benchmark section.
"""

from __future__ import annotations

import os
import platform
import time
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from bench.measure import measured
from bench.methods import FitData, Method, MethodOptions, build_methods
from bench.suite_data import InMemory, SeedData, SynthSpec, prepare
from dcad.core.config import DCADConfig, load_config
from dcad.core.errors import DcadError
from dcad.core.metrics import DEFECT_METRIC_KEYS, AnomalyEvaluator

SCHEMA = "dcad.bench.suite/1"
Log = Callable[[str], None]


@dataclass
class SuiteOptions:
    profile: str = "cpu"
    config_path: Path | None = None  # a config file (e.g. a model directory's) instead of the profile
    seeds: list[int] = field(default_factory=lambda: [0, 1])
    methods: list[str] = field(default_factory=list)
    out: Path = Path("bench/results")
    cache: Path = Path(".dcad/bench-data")
    synth: SynthSpec = field(default_factory=SynthSpec)
    overrides: list[str] = field(default_factory=list)
    method_options: MethodOptions = field(default_factory=MethodOptions)
    batch_cap: int = 32
    device: str = "cpu"
    quick: bool = False


def seed_config(options: SuiteOptions, seed: int) -> DCADConfig:
    profile = None if options.config_path else options.profile
    return load_config(profile, options.config_path, [*options.overrides, f"train.seed={seed}"])


# ---- one method ------------------------------------------------------------------------------------------
def check_outputs(name: str, scores: torch.Tensor, maps: torch.Tensor, n: int, size: int) -> None:
    if tuple(scores.shape) != (n,) or tuple(maps.shape) != (n, size, size):
        raise DcadError(f"method {name}: predict returned scores {tuple(scores.shape)} and maps {tuple(maps.shape)}, "
                        f"expected ({n},) and ({n}, {size}, {size})")
    if not (torch.isfinite(scores).all() and torch.isfinite(maps).all()):
        raise DcadError(f"method {name}: predict returned non-finite scores or maps")


def timed_predictions(method: Method, test: InMemory, batch: int) -> tuple[torch.Tensor, torch.Tensor, Any]:
    """(scores [N], maps [N,H,W], measurement) over the whole test split; one image first, untimed (warm-up)."""
    method.predict(test.images[:1], test.categories[:1])
    scores, maps = [], []
    with measured() as m:
        for start in range(0, len(test), batch):
            s, a = method.predict(test.images[start : start + batch], test.categories[start : start + batch])
            scores.append(s.detach().float().cpu())
            maps.append(a.detach().float().cpu())
    return torch.cat(scores), torch.cat(maps), m


def quality(test: InMemory, scores: torch.Tensor, maps: torch.Tensor) -> dict[str, Any]:
    evaluator = AnomalyEvaluator(track_defect_types=True)
    for start in range(0, len(test), 32):
        part = slice(start, start + 32)
        evaluator.update(scores[part], test.labels[part], maps[part], test.masks[part],
                         test.categories[part], test.defect_types[part])
    result = evaluator.compute()
    return {
        "mean": result["mean"],
        "categories": result["categories"],
        "defect_types": mean_over_categories(result["defect_types"]),
        "defect_types_by_category": result["defect_types"],
        "defect_images": defect_image_counts(test),
    }


def defect_image_counts(test: InMemory) -> dict[str, int]:
    """How many anomalous test images each defect type has (a per-type value from few images is noise)."""
    counts: dict[str, int] = {}
    for label, defect in zip(test.labels.tolist(), test.defect_types):
        if label == 1:
            counts[defect] = counts.get(defect, 0) + 1
    return dict(sorted(counts.items()))


def mean_over_categories(by_category: dict[str, dict[str, dict[str, float]]]) -> dict[str, dict[str, float]]:
    """Per defect type: the unweighted mean over the categories that have it (nan left out)."""
    values: dict[str, dict[str, list[float]]] = {}
    for defects in by_category.values():
        for defect, metrics in defects.items():
            for key in DEFECT_METRIC_KEYS:
                values.setdefault(defect, {}).setdefault(key, []).append(metrics[key])
    return {
        defect: {key: _nanmean(v) for key, v in metrics.items()}
        for defect, metrics in sorted(values.items())
    }


def _nanmean(values: list[float]) -> float:
    finite = [v for v in values if not np.isnan(v)]
    return float(np.mean(finite)) if finite else float("nan")


def evaluation_indices(n: int, limit: int | None, keep: list[int]) -> list[int]:
    """All test images, or `limit` evenly spaced ones (the split is category-major, so every category and
    both labels are represented) plus the images shown in the heatmap figure."""
    if limit is None or limit >= n:
        return list(range(n))
    spaced = np.linspace(0, n - 1, limit).round().astype(int).tolist()
    return sorted(set(spaced) | set(keep))


def run_method(method: Method, fit_data: FitData, test: InMemory, batch_cap: int,
               keep: list[int]) -> tuple[dict, torch.Tensor]:
    """The method's result entry and its maps of the test images at positions `keep` (for the figure).

    A method with `max_test_images` (an expensive one) is evaluated on a subset of the test split.
    """
    with measured() as fit:
        method.fit(fit_data)
    training = getattr(method, "training", None) or fit
    batch = max(1, min(method.batch_size, batch_cap))
    chosen = evaluation_indices(len(test), getattr(method, "max_test_images", None), keep)
    subset = test.subset(chosen)
    scores, maps, infer = timed_predictions(method, subset, batch)
    check_outputs(method.name, scores, maps, len(subset), fit_data.cfg.data.image_size)
    speed = {
        "train_s": training.seconds,
        "fit_wall_s": fit.seconds,
        "fit_peak_rss_delta_mb": training.peak_rss_delta_mb,
        "test_images": len(subset),
        "infer_s": infer.seconds,
        "images_per_s": len(subset) / max(infer.seconds, 1e-9),
        "ms_per_image": 1000.0 * infer.seconds / len(subset),
        "batch_size": batch,
        "infer_peak_rss_delta_mb": infer.peak_rss_delta_mb,
        "unet_passes_per_image": int(getattr(method, "unet_passes", 0)),
        "refined_pixel_fraction": None,
        "refined_image_fraction": None,
    }
    if hasattr(method, "refined_fractions"):
        speed["refined_pixel_fraction"], speed["refined_image_fraction"] = method.refined_fractions()
    result = {"quality": quality(subset, scores, maps) | {"test_images": len(subset)}, "speed": speed}
    return result, maps[[chosen.index(i) for i in keep]]


def heatmap_indices(test: InMemory) -> list[int]:
    """The first test image of each defect type (sorted by name)."""
    first: dict[str, int] = {}
    for i, defect in enumerate(test.defect_types):
        if test.labels[i] == 1:
            first.setdefault(defect, i)
    return [first[d] for d in sorted(first)]


# ---- one seed --------------------------------------------------------------------------------------------
def run_seed(options: SuiteOptions, seed: int, log: Log) -> tuple[dict, dict]:
    """(the seed's results, heatmap samples {"indices", "images", "masks", "defects", "maps": {method: [K,H,W]}})."""
    cfg = seed_config(options, seed)
    spec = replace(options.synth, size=options.synth.size or cfg.data.image_size)
    data: SeedData = prepare(options.cache, spec, seed, cfg)
    log(f"seed {seed}: {data.root} — {len(data.train)} train, {len(data.splits.val)} val, {len(data.test)} test images")
    fit_data = FitData(cfg, data.train.images, data.train.categories, data.splits.categories, data.splits.val,
                       data.splits, torch.device(options.device), seed)
    picked = heatmap_indices(data.test)
    samples = {"images": data.test.images[picked], "masks": data.test.masks[picked],
               "defects": [data.test.defect_types[i] for i in picked],
               "categories": [data.test.categories[i] for i in picked], "maps": {}}
    results: dict[str, Any] = {}
    for method in build_methods(options.methods, options.method_options):
        started = time.perf_counter()
        results[method.name], maps = run_method(method, fit_data, data.test, options.batch_cap, picked)
        if not method.info.budget_curve:
            samples["maps"][method.name] = maps
        mean = results[method.name]["quality"]["mean"]
        log(f"  {method.name:<18} image AUROC {mean['image_auroc']:.3f}  pixel AUROC {mean['pixel_auroc']:.3f}  "
            f"AUPRO {mean['aupro']:.3f}  {results[method.name]['speed']['ms_per_image']:.1f} ms/img  "
            f"({time.perf_counter() - started:.0f} s)")
    entry = {
        "seed": seed,
        "dataset": {"root": str(data.root), "size": spec.size, "n_train": spec.n_train, "n_test": spec.n_test,
                    "categories": data.splits.categories, "train_images": len(data.train),
                    "val_images": len(data.splits.val), "test_images": len(data.test),
                    "digest": data.splits.index.digest()},
        "methods": results,
        "refiner_vs_reverse_diffusion": refiner_vs_reverse(results),
    }
    return entry, samples


def refiner_vs_reverse(results: dict[str, Any]) -> dict[str, float] | None:
    """Cost and quality of DRDC's selected-timestep refinement against the full reverse chain."""
    if "reverse_diffusion" not in results or "drdc" not in results:
        return None
    rev, full = results["reverse_diffusion"], results["drdc"]
    out = {
        "drdc_ms_per_image": full["speed"]["ms_per_image"],
        "reverse_ms_per_image": rev["speed"]["ms_per_image"],
        "time_ratio": rev["speed"]["ms_per_image"] / max(full["speed"]["ms_per_image"], 1e-9),
        "drdc_unet_passes": full["speed"]["unet_passes_per_image"],
        "reverse_unet_passes": rev["speed"]["unet_passes_per_image"],
    }
    if "drdc_refine_only" in results:
        ref = results["drdc_refine_only"]
        out["refine_only_ms_per_image"] = ref["speed"]["ms_per_image"]
        out["time_ratio_vs_refine_only"] = rev["speed"]["ms_per_image"] / max(ref["speed"]["ms_per_image"], 1e-9)
    return out


# ---- the suite -------------------------------------------------------------------------------------------
def machine() -> dict[str, Any]:
    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_avg_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }


def run_suite(options: SuiteOptions, log: Log = print) -> tuple[dict, dict]:
    """All seeds and methods; returns (results document, heatmap samples of the first seed)."""
    started = time.perf_counter()
    doc: dict[str, Any] = {
        "schema": SCHEMA,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "quick": options.quick,
        "profile": options.profile,
        "overrides": options.overrides,
        "seeds": options.seeds,
        "batch_cap": options.batch_cap,
        "machine": machine(),
        "methods": {m.name: vars(m.info) | {"name": m.name}
                    for m in build_methods(options.methods, options.method_options)},
        "runs": [],
    }
    samples: dict = {}
    for seed in options.seeds:
        entry, seed_samples = run_seed(options, seed, log)
        doc["runs"].append(entry)
        samples = samples or seed_samples
    doc["machine"]["load_avg_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    doc["wall_s"] = time.perf_counter() - started
    return doc, samples
