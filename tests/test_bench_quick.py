"""`python -m bench --quick`: the schema of its results (keys, types, ranges, every method and category),
not the numbers; plus the small pieces of the suite that can be checked on their own."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `bench` is a folder of the repository, not an installed package
    sys.path.insert(0, str(REPO))

from bench.__main__ import RESULT_FILES, main  # noqa: E402
from bench.methods import METHOD_NAMES  # noqa: E402
from bench.suite_report import (  # noqa: E402
    README_END,
    README_START,
    breakdown_table,
    defect_counts_line,
    quality_table,
    refinement_gain,
    rewrite_readme,
    summarise,
)
from dcad.core.data import open_dataset  # noqa: E402
from dcad.core.metrics import DEFECT_METRIC_KEYS, METRIC_KEYS  # noqa: E402

BATCH_CAP = 8
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _reject_constant(name: str) -> None:
    raise ValueError(f"non-standard JSON constant {name}")


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory) -> tuple[dict, Path, Path]:
    out = tmp_path_factory.mktemp("bench")
    readme = out / "README.md"
    readme.write_text(f"# x\n\n## Benchmarks\n\n{README_START}\nold\n{README_END}\n")
    code = main(["--quick", "--out", str(out / "results"), "--cache", str(out / "data"),
                 "--batch-size", str(BATCH_CAP), "--readme", str(readme)])
    assert code == 0
    text = (out / "results" / RESULT_FILES["json"]).read_text()
    return json.loads(text, parse_constant=_reject_constant), out, readme


def _in_unit_range(value) -> bool:
    return isinstance(value, float) and 0.0 <= value <= 1.0


def _dataset_truth(root: str) -> tuple[set[str], set[str]]:
    """Categories and defect types of the test split, read from the dataset itself."""
    index = open_dataset(root)
    return set(index.categories), {r.defect_type for r in index.test if r.label == 1}


@pytest.mark.slow
def test_quick_run_lists_every_method_for_every_seed(quick_run):
    doc = quick_run[0]
    assert doc["schema"] == "dcad.bench.suite/1" and doc["quick"] is True and doc["profile"] == "tiny"
    assert set(doc["methods"]) == set(METHOD_NAMES)
    assert [run["seed"] for run in doc["runs"]] == doc["seeds"] == [0]
    for run in doc["runs"]:
        assert set(run["methods"]) == set(METHOD_NAMES)
    for info in doc["methods"].values():
        assert isinstance(info["description"], str) and isinstance(info["multi_class"], bool)


@pytest.mark.slow
def test_quality_has_every_category_and_defect_type_within_unit_range(quick_run):
    for run in quick_run[0]["runs"]:
        categories, defects = _dataset_truth(run["dataset"]["root"])
        assert set(run["dataset"]["categories"]) == categories
        for name, result in run["methods"].items():
            q = result["quality"]
            assert set(q["mean"]) == set(METRIC_KEYS), name
            assert all(_in_unit_range(v) for v in q["mean"].values()), (name, q["mean"])
            assert set(q["categories"]) == categories, name
            for metrics in q["categories"].values():
                assert set(metrics) == set(METRIC_KEYS) and all(_in_unit_range(v) for v in metrics.values()), name
            assert set(q["defect_types"]) == defects, name
            for metrics in q["defect_types"].values():
                assert set(metrics) == set(DEFECT_METRIC_KEYS), name
                assert all(_in_unit_range(v) for v in metrics.values()), (name, metrics)


@pytest.mark.slow
def test_speed_entries_are_consistent(quick_run):
    for run in quick_run[0]["runs"]:
        for name, result in run["methods"].items():
            s = result["speed"]
            assert 0 < s["test_images"] <= run["dataset"]["test_images"], name
            assert s["train_s"] > 0 and s["infer_s"] > 0, name
            assert math.isclose(s["images_per_s"], s["test_images"] / s["infer_s"], rel_tol=1e-6), name
            assert math.isclose(s["ms_per_image"] * s["images_per_s"], 1000.0, rel_tol=1e-6), name
            assert 1 <= s["batch_size"] <= BATCH_CAP, name
            assert s["fit_peak_rss_delta_mb"] >= 0 and s["infer_peak_rss_delta_mb"] >= 0, name
        passes = {name: r["speed"]["unet_passes_per_image"] for name, r in run["methods"].items()}
        assert passes["drdc_base_only"] == passes["anomalib_patchcore"] == 0
        assert 0 < passes["drdc"] == passes["drdc_refine_only"] < passes["reverse_diffusion"]
        refined = {name: r["speed"]["refined_pixel_fraction"] for name, r in run["methods"].items()}
        assert refined["drdc_base_only"] == 0 and refined["anomalib_padim"] is None
        assert refined["drdc_refine_all"] == refined["drdc_refine_only"] == 1.0
        assert refined["drdc"] == pytest.approx((32 / 64) ** 2)  # tiny: one 32 px window of a 64 px image
        assert run["methods"]["drdc"]["speed"]["refined_image_fraction"] == 1.0
        ratio = run["refiner_vs_reverse_diffusion"]
        assert ratio["time_ratio"] == pytest.approx(ratio["reverse_ms_per_image"] / ratio["drdc_ms_per_image"])


@pytest.mark.slow
def test_summary_figures_and_readme(quick_run):
    doc, out, readme = quick_run
    assert set(doc["summary"]) == set(METHOD_NAMES)
    for stats in doc["summary"].values():
        assert all(_in_unit_range(stats["mean"][k]["mean"]) for k in METRIC_KEYS)
    for key in ("quality_latency", "heatmaps"):
        assert (out / "results" / RESULT_FILES[key]).read_bytes()[:8] == PNG_MAGIC
    table = (out / "results" / RESULT_FILES["markdown"]).read_text()
    assert all(f"| {name} |" in table for name in METHOD_NAMES)
    budget = table.split("**Refinement budget")[1].split("\n\n")[1]  # least to most refined
    rows = [line.split(" | ")[0].strip("| ") for line in budget.splitlines()[2:]]
    assert rows[0] == "drdc_base_only" and rows[-1] in ("drdc_refine_all", "drdc_windows2", "drdc_window64")
    assert "× its base branch" in table
    assert "old" in readme.read_text()  # --quick never rewrites a README


@pytest.mark.slow
def test_defect_image_counts_match_the_dataset(quick_run):
    for run in quick_run[0]["runs"]:
        index = open_dataset(run["dataset"]["root"])
        truth: dict[str, int] = {}
        for record in index.test:
            if record.label == 1:
                truth[record.defect_type] = truth.get(record.defect_type, 0) + 1
        assert run["methods"]["drdc"]["quality"]["defect_images"] == truth
        subset = run["methods"]["reverse_diffusion"]["quality"]["defect_images"]
        assert set(subset) <= set(truth) and all(subset[d] <= truth[d] for d in subset)


@pytest.mark.slow
def test_report_only_rerenders_tables_from_the_json(quick_run):
    doc, out, readme = quick_run
    results = out / "results"
    heatmaps = results / RESULT_FILES["heatmaps"]
    heatmap_bytes = heatmaps.read_bytes()
    (results / RESULT_FILES["markdown"]).unlink()
    (results / RESULT_FILES["quality_latency"]).unlink()
    assert main(["--report-only", "--out", str(results), "--readme", str(readme)]) == 0
    table = (results / RESULT_FILES["markdown"]).read_text()
    assert all(f"| {name} |" in table for name in METHOD_NAMES)
    budget = table.split("**Refinement budget")[1].split("\n\n")[1]  # least to most refined
    rows = [line.split(" | ")[0].strip("| ") for line in budget.splitlines()[2:]]
    assert rows[0] == "drdc_base_only" and rows[-1] in ("drdc_refine_all", "drdc_windows2", "drdc_window64")
    assert "× its base branch" in table
    assert (results / RESULT_FILES["quality_latency"]).read_bytes()[:8] == PNG_MAGIC
    assert heatmaps.read_bytes() == heatmap_bytes  # kept: the samples are not in the JSON
    assert "old" in readme.read_text()  # a quick run's results never reach a README


def test_report_only_without_results_fails_in_one_line(tmp_path, capsys):
    assert main(["--report-only", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "suite.json" in err and "python -m bench" in err
    (tmp_path / RESULT_FILES["json"]).write_text('{"schema": "something else"}')
    assert main(["--report-only", "--out", str(tmp_path)]) == 2
    assert "dcad.bench.suite/1" in capsys.readouterr().err


def _method_result(value: float, test_images: int) -> dict:
    metrics = {"image_auroc": value, "pixel_auroc": value, "aupro": value, "pixel_ap": value}
    speed = {"test_images": test_images, "train_s": 1.0, "images_per_s": 1.0, "ms_per_image": 1000.0,
             "fit_peak_rss_delta_mb": 0.0, "infer_peak_rss_delta_mb": 0.0, "unet_passes_per_image": 0,
             "batch_size": 1}
    defects = {"faint_scratch": {k: v for k, v in metrics.items() if k != "pixel_ap"} | {"pixel_ap": value},
               "hole": {k: value + 0.01 for k in metrics}}
    return {"quality": {"mean": metrics, "categories": {"brick": metrics}, "defect_types": defects,
                        "defect_images": {"faint_scratch": min(test_images, 3), "hole": 4}},
            "speed": speed}


def test_defect_tables_leave_out_subset_methods_and_gain_is_full_minus_base():
    methods = {"drdc": 0.9, "drdc_base_only": 0.8, "reverse_diffusion": 0.99}
    doc = {"methods": {m: {"multi_class": True} for m in methods},
           "runs": [{"seed": 7, "dataset": {"test_images": 20},
                     "methods": {m: _method_result(v, 5 if m == "reverse_diffusion" else 20)
                                 for m, v in methods.items()}}]}
    summary = summarise(doc)
    assert "| reverse_diffusion |" in quality_table(doc, summary)  # the mean table keeps it, with its image count
    defect_table = breakdown_table(doc, summary, "defect_types", "pixel_auroc")
    assert "reverse_diffusion" not in defect_table and "| drdc |" in defect_table
    assert "reverse_diffusion" in breakdown_table(doc, summary, "categories", "pixel_auroc")
    gain = refinement_gain(summary)
    assert set(gain) == {"faint_scratch", "hole"}
    assert gain["hole"]["aupro"] == pytest.approx(0.1) and gain["faint_scratch"]["image_auroc"] == pytest.approx(0.1)
    assert defect_counts_line(doc) == "Anomalous test images per type (seed 7): faint_scratch 3, hole 4."


def test_readme_markers_are_created_under_the_heading_and_then_replaced(tmp_path):
    readme = tmp_path / "README.md"
    original = "# t\n\n## Benchmarks\n\nScripts are in bench/.\n\n## Other\n\ntext\n"
    readme.write_text(original)
    rewrite_readme(readme, "first table")
    text = readme.read_text()
    assert text.index("Scripts are in bench/.") < text.index(README_START) < text.index("first table") < text.index("## Other")
    rewrite_readme(readme, "second table")
    text = readme.read_text()
    assert "first table" not in text and text.count(README_START) == 1
    assert text.replace(f"{README_START}\nsecond table\n{README_END}\n\n", "") == original


def test_evaluation_subset_spans_the_split_and_keeps_the_figure_images():
    from bench.suite import evaluation_indices

    categories = [c for c in ("a", "b", "c", "d", "e", "f") for _ in range(30)]  # category-major, like the split
    chosen = evaluation_indices(len(categories), 24, keep=[7, 100])
    assert chosen == sorted(set(chosen)) and {7, 100} <= set(chosen) and len(chosen) <= 26
    assert {categories[i] for i in chosen} == set(categories)
    assert evaluation_indices(10, None, keep=[3]) == evaluation_indices(10, 50, keep=[]) == list(range(10))
