"""`dcad eval` / `dcad predict` on a trained tiny model, model-directory errors, and no test leakage."""

from __future__ import annotations

import csv
import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dcad.core.metrics import METRIC_KEYS

pytestmark = pytest.mark.slow


def dcad(*args: str) -> subprocess.CompletedProcess:
    """`dcad ARGS` in this process, its output captured: a subprocess spends ~10 s importing torch for each
    call. (`tests/test_cli_startup.py` runs real processes.)"""
    import contextlib
    import io

    from fixtures_mlflow import run_main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = run_main(*args)
    return subprocess.CompletedProcess(["dcad", *args], code, out.getvalue(), err.getvalue())


def _one_line_error(proc: subprocess.CompletedProcess, needle: str) -> None:
    assert proc.returncode == 2, proc.stderr
    assert needle in proc.stderr
    assert "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) <= 3  # one message (rich may wrap long paths)


def test_eval_json_contract_matches_the_training_report(trained, tmp_path):
    out = tmp_path / "metrics.json"
    proc = dcad("eval", str(trained.model_dir), "--data", str(trained.data), "--json", str(out), "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    assert set(result["mean"]) >= set(METRIC_KEYS)
    assert sorted(result["categories"]) == sorted(json.loads((trained.model_dir / "dcad_model.json").read_text())["categories"])
    for metrics in [result["mean"], *result["categories"].values()]:
        for key in METRIC_KEYS:
            assert metrics[key] is None or 0.0 <= metrics[key] <= 1.0
    # eval is deterministic and agrees with the one test evaluation done by `dcad train`
    at_train = json.loads((trained.model_dir / "metrics.json").read_text())
    for key in METRIC_KEYS:
        assert result["mean"][key] == pytest.approx(at_train["mean"][key], abs=1e-6)


def test_eval_set_switches_ablations_without_retraining(trained, tmp_path):
    out = tmp_path / "base.json"
    proc = dcad("eval", str(trained.model_dir), "--data", str(trained.data), "--json", str(out), "--device", "cpu",
                "--set", "ablation.mode=base_only")
    assert proc.returncode == 0, proc.stderr
    base_only = json.loads(out.read_text())["mean"]
    full = json.loads((trained.model_dir / "metrics.json").read_text())["mean"]
    assert any(base_only[k] != pytest.approx(full[k], abs=1e-6) for k in ("pixel_auroc", "aupro"))
    _one_line_error(
        dcad("eval", str(trained.model_dir), "--data", str(trained.data), "--set", "base.hidden_dim=8"),
        "changes the trained model",
    )


def test_predict_writes_maps_overlays_and_scores(trained, tmp_path):
    images = sorted((trained.data).glob("*/test/*/*.png"))[:6]
    src = tmp_path / "in"
    src.mkdir()
    for i, p in enumerate(images):  # different sizes and modes are converted; the same stem in two folders
        img = Image.open(p)
        img = img.convert("L") if i % 2 else img.resize((100, 80))
        (src / f"part{i % 2}").mkdir(exist_ok=True)
        img.save(src / f"part{i % 2}" / f"{i // 2}.png")
    out = tmp_path / "pred"
    proc = dcad("predict", str(trained.model_dir), str(src), "--out", str(out), "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    rows = list(csv.DictReader((out / "predictions.csv").open()))
    assert len(rows) == len(images)
    meta = json.loads((trained.model_dir / "dcad_model.json").read_text())
    assert len({r["map"] for r in rows}) == len(rows), "each image gets its own map"
    for row in rows:
        folder, stem = Path(row["path"]).parts[-2:]
        assert row["map"] == f"maps/{folder}__{Path(stem).stem}.png", "the map is named after the image's path"
        assert (out / row["map"]).is_file() and (out / row["overlay"]).is_file()
        assert row["category_source"] == "predicted" and row["category"] in meta["categories"]
        assert (row["decision"] == "anomalous") == (float(row["score"]) > meta["image_threshold"])
        assert 0.0 <= float(row["normalized_score"]) <= 1.0
    overlay = np.asarray(Image.open(out / rows[0]["overlay"]))
    assert overlay.shape == (80, 100, 3)  # maps come back at the input's own size


def test_predicted_category_matches_the_folder(trained, tmp_path):
    out = tmp_path / "pred"
    images = sorted(trained.data.glob("*/test/good/*.png"))
    proc = dcad("predict", str(trained.model_dir), *map(str, images), "--out", str(out), "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    rows = list(csv.DictReader((out / "predictions.csv").open()))
    truth = [Path(r["path"]).parts[-4] for r in rows]
    accuracy = np.mean([r["category"] == t for r, t in zip(rows, truth)])
    assert accuracy >= 0.8


def test_predict_bad_inputs(trained, tmp_path):
    img = next(trained.data.glob("*/test/good/*.png"))
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("user data")
    _one_line_error(dcad("predict", str(trained.model_dir), str(img), "--out", str(busy)), "not empty")
    assert (busy / "keep.txt").read_text() == "user data"
    _one_line_error(
        dcad("predict", str(trained.model_dir), str(img), "--out", str(tmp_path / "o1"), "--category", "teapot"),
        "unknown category 'teapot'",
    )
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    _one_line_error(dcad("predict", str(trained.model_dir), str(broken), "--out", str(tmp_path / "o2")), "broken.png")
    assert not (tmp_path / "o2").exists()  # nothing written before the input was validated
    _one_line_error(dcad("predict", str(tmp_path / "nope"), str(img), "--out", str(tmp_path / "o3")), "does not exist")
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "weights.bin").write_bytes(b"x")
    _one_line_error(dcad("eval", str(foreign), "--data", str(trained.data)), "not a dcad model directory")


def test_incompatible_model_directory(trained, tmp_path):
    from dcad.core.errors import ModelError
    from dcad.core.model.model_dir import load_model

    import shutil

    copy = tmp_path / "model"
    shutil.copytree(trained.model_dir, copy, ignore=shutil.ignore_patterns("checkpoints", "report"))
    meta = json.loads((copy / "dcad_model.json").read_text())
    (copy / "dcad_model.json").write_text(json.dumps({**meta, "format_version": 99}))
    with pytest.raises(ModelError, match="format version 99"):
        load_model(copy)
    (copy / "dcad_model.json").write_text(json.dumps(meta))
    cfg = (copy / "config.yaml").read_text()
    (copy / "config.yaml").write_text(cfg.replace("hidden_dim: 64", "hidden_dim: 32", 1))
    with pytest.raises(ModelError, match="do not match the config"):
        load_model(copy)
    (copy / "config.yaml").write_text(cfg + "\nmystery: 1\n")
    with pytest.raises(ModelError, match="unknown key 'mystery'"):
        load_model(copy)


def test_training_never_reads_the_test_split(tmp_path):
    """Thresholds, normalisation and model selection see train + validation only."""
    from fixtures_mlflow import synth_dataset

    from dcad.core.config import load_config
    from dcad.core.data import build_splits
    from dcad.train.pipeline import train_drdc

    class Forbidden:
        def __len__(self):
            raise AssertionError("the test split was read during training")

        def __getitem__(self, i):
            raise AssertionError("the test split was read during training")

    data = synth_dataset(tmp_path / "data", categories=2, n_train=8, n_test=4)
    cfg = load_config(
        profile="tiny",
        overrides=["train.base.epochs=1", "train.base.iters_per_epoch=3", "train.refiner.epochs=1", "train.refiner.iters_per_epoch=2"],
    )
    splits = build_splits(data, cfg.data)
    splits.test = Forbidden()
    model, val_metrics = train_drdc(cfg, splits, device=__import__("torch").device("cpu"))
    assert np.isfinite(float(model.calibration.image_threshold))
    assert "val_image_auroc" in val_metrics
