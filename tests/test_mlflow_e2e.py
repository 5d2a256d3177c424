"""A trained tiny model end to end: what its run holds, the pyfunc model, serving parity, eval --log,
gated promotion with real evaluations, and a tracking server lost in the middle of training."""

from __future__ import annotations

import base64
import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import requests
from fixtures_mlflow import run_dcad, train_args
from fixtures_servers import HOST, free_port, mlflow_server, start_process
from PIL import Image

from dcad.core.config import DCADConfig
from dcad.core.data import CATEGORIES
from dcad.core.metrics import METRIC_KEYS
from dcad.platform.mlflow_store import mlflow_client

pytestmark = pytest.mark.slow


def test_training_run_holds_params_metrics_dataset_artifacts_and_model(trained, tmp_path):
    client = mlflow_client(trained.tracking_uri)
    run = client.get_run(trained.run_id)
    cfg = DCADConfig.from_yaml(trained.model_dir / "config.yaml")
    flat = cfg.flat()
    assert run.info.status == "FINISHED" and run.info.run_name == "tiny"
    assert set(run.data.params) == set(flat)
    assert run.data.params["train.base.iters_per_epoch"] == "10" and run.data.params["profile"] == "tiny"

    # Per-epoch metrics with the epoch as step; final test metrics equal metrics.json.
    history = client.get_metric_history(trained.run_id, "base_train_loss")
    assert [m.step for m in history] == [1, 2]
    written = json.loads((trained.model_dir / "metrics.json").read_text())
    for key in METRIC_KEYS:
        assert run.data.metrics[f"test_{key}"] == pytest.approx(written["mean"][key], nan_ok=True)
        for cat, values in written["categories"].items():
            assert run.data.metrics[f"test_{key}/{cat}"] == pytest.approx(values[key], nan_ok=True)

    # Tags and the dataset input.
    from dcad.core.data import open_dataset

    digest = open_dataset(trained.data).digest()
    tags = run.data.tags
    assert tags["dcad.version"] and tags["dcad.dataset_digest"] == digest
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parents[1], capture_output=True, text=True)
    if commit.returncode == 0:
        assert tags["mlflow.source.git.commit"] == commit.stdout.strip()
    (dataset,) = run.inputs.dataset_inputs
    assert json.loads(dataset.dataset.source)["uri"] == str(trained.data.resolve())
    assert digest.startswith(dataset.dataset.digest) and dataset.tags[0].value == "train"

    # Artifacts: config, metrics table, plots and heatmaps are real files.
    local = Path(client.download_artifacts(trained.run_id, "", str(tmp_path)))
    assert DCADConfig.from_yaml(local / "config.yaml") == cfg
    rows = list(csv.reader((local / "report" / "per_category.csv").open()))
    assert [r[0] for r in rows[1:]] == [*written["categories"], "mean"]
    for png in ("roc.png", "pro.png", "heatmaps.png"):
        with Image.open(local / "report" / png) as img:
            assert img.width > 200 and img.height > 100

    # The model: signature, explicit requirements, the model directory without checkpoints.
    model = _download(trained)
    mlmodel = (model / "MLmodel").read_text()
    assert "binary" in mlmodel and "anomaly_map" in mlmodel and "python_function" in mlmodel
    requirements = (model / "requirements.txt").read_text().split()
    assert "dcad==0.1.0" in requirements and any(r.startswith("torch==") for r in requirements)
    packaged = model / "artifacts" / "model_dir"
    assert (packaged / "base" / "model.safetensors").is_file() and not (packaged / "checkpoints").exists()
    assert (trained.model_dir / "checkpoints").is_dir()


def _download(trained) -> Path:
    import mlflow.artifacts

    from dcad.platform.mlflow_store import use_store

    with use_store(trained.tracking_uri):  # models:/ URIs resolve through MLflow's global URIs
        return Path(mlflow.artifacts.download_artifacts(trained.model_uri))


def _test_images(data: Path, n: int = 6) -> list[Path]:
    return sorted(data.glob("*/test/*/*.png"))[:n]


def test_pyfunc_model_loads_and_matches_predict(trained):
    import mlflow.pyfunc
    import pandas as pd

    from dcad.core.data import load_image
    from dcad.core.model.model_dir import load_model
    from dcad.core.predict import predict_arrays

    mlflow.set_tracking_uri(trained.tracking_uri)
    files = _test_images(trained.data)
    model = mlflow.pyfunc.load_model(trained.model_uri)
    out = model.predict(pd.DataFrame({"image": [f.read_bytes() for f in files]}))
    expected = predict_arrays(load_model(trained.model_dir), [load_image(f) for f in files])
    np.testing.assert_allclose(out["score"].to_numpy(), expected.scores, atol=1e-5)
    np.testing.assert_array_equal(out["decision"].to_numpy(), expected.decisions)
    assert list(out["category"]) == expected.categories
    np.testing.assert_allclose(np.array(out["anomaly_map"][0], dtype=np.float32), expected.anomaly_maps[0], atol=1e-5)


def test_served_model_answers_http_with_the_scores_of_dcad_predict(trained, tmp_path, capsys):
    files = _test_images(trained.data)
    predicted = run_dcad(capsys, "predict", str(trained.model_dir), *map(str, files), "--out", str(tmp_path / "pred"), "--device", "cpu")
    assert predicted.code == 0, predicted.err
    cli_scores = {r["path"]: float(r["score"]) for r in csv.DictReader((tmp_path / "pred" / "predictions.csv").open())}

    port = free_port()
    env = {**os.environ, "MLFLOW_TRACKING_URI": trained.tracking_uri}
    cmd = [sys.executable, "-m", "mlflow", "models", "serve", "-m", trained.model_uri, "--env-manager", "local", "-h", HOST, "-p", str(port)]
    with start_process(cmd, f"http://{HOST}:{port}", "/ping", tmp_path / "serve.log", env) as server:
        payload = {"dataframe_split": {"columns": ["image"], "data": [[base64.b64encode(f.read_bytes()).decode()] for f in files]}}
        response = requests.post(server.url + "/invocations", json=payload, timeout=300)
    assert response.status_code == 200, response.text[:500]
    rows = response.json()["predictions"]
    served = [row["score"] for row in rows]
    expected = [cli_scores[str(f)] for f in files]
    np.testing.assert_allclose(served, expected, atol=1e-5)  # the CSV keeps 6 decimals
    assert {len(row["anomaly_map"]) for row in rows} == {64}


def test_eval_of_a_runs_uri_logs_an_evaluation_run(trained, tmp_path, capsys, decoy_global_store):
    out = tmp_path / "eval.json"
    result = run_dcad(capsys, "eval", f"runs:/{trained.run_id}/model", "--data", str(trained.data), "--json", str(out),
                      "--log", "--experiment", "evals", "--run-name", "re-eval", "--tracking-uri", trained.tracking_uri, "--device", "cpu")
    assert result.code == 0, result.err
    evaluated = json.loads(out.read_text())
    trained_metrics = json.loads((trained.model_dir / "metrics.json").read_text())
    assert evaluated["mean"]["image_auroc"] == pytest.approx(trained_metrics["mean"]["image_auroc"])
    client = mlflow_client(trained.tracking_uri)
    (run,) = client.search_runs([client.get_experiment_by_name("evals").experiment_id])
    assert run.info.run_name == "re-eval" and run.data.tags["dcad.kind"] == "eval"
    assert run.data.metrics["test_pixel_auroc"] == pytest.approx(evaluated["mean"]["pixel_auroc"])
    assert run.inputs.dataset_inputs[0].tags[0].value == "evaluation"
    assert {a.path for a in client.list_artifacts(run.info.run_id, "report")} >= {"report/roc.png", "report/heatmaps.png"}


def _blind_copy(model_dir: Path, dst: Path) -> Path:
    """The same model with its backbone's convolutions zeroed: every image gets the same map and score."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(model_dir, dst, ignore=shutil.ignore_patterns("checkpoints", "report"))
    state = load_file(str(dst / "backbone" / "model.safetensors"))
    for key, tensor in state.items():
        if key.endswith("weight") and tensor.ndim == 4:
            state[key] = tensor.zero_()
    save_file(state, str(dst / "backbone" / "model.safetensors"))
    return dst


def test_promotion_through_the_gate_with_real_evaluations(trained, tmp_path, capsys, decoy_global_store):
    uri = trained.tracking_uri
    first = run_dcad(capsys, "promote", "dcad-e2e", "--run", trained.run_id, "--tracking-uri", uri, "--device", "cpu")
    assert first.code == 0 and "first holder" in first.out, first.err
    champion_metrics = json.loads((trained.model_dir / "metrics.json").read_text())["categories"]
    assert max(m["image_auroc"] for m in champion_metrics.values()) > 0.52, "the tiny model should beat chance somewhere"

    blind = _blind_copy(trained.model_dir, tmp_path / "blind")
    logged = run_dcad(capsys, "log", str(blind), "--experiment", "e2e", "--run-name", "blind", "--data", str(trained.data), "--tracking-uri", uri)
    assert logged.code == 0, logged.err
    client = mlflow_client(uri)
    blind_run = client.search_runs([client.get_experiment_by_name("e2e").experiment_id], "attributes.run_name = 'blind'")[0]
    refused = run_dcad(capsys, "promote", "dcad-e2e", "--run", blind_run.info.run_id, "--tracking-uri", uri, "--device", "cpu")
    assert refused.code == 3 and "regressed" in refused.out and "refused" in refused.err
    assert str(client.get_model_version_by_alias("dcad-e2e", "champion").version) == "1"

    same = run_dcad(capsys, "log", str(trained.model_dir), "--experiment", "e2e", "--run-name", "again", "--tracking-uri", uri)
    again = client.search_runs([client.get_experiment_by_name("e2e").experiment_id], "attributes.run_name = 'again'")[0]
    accepted = run_dcad(capsys, "promote", "dcad-e2e", "--run", again.info.run_id, "--tracking-uri", uri, "--device", "cpu")
    assert same.code == 0 and accepted.code == 0 and "gate passed" in accepted.out, accepted.err
    version = client.get_model_version_by_alias("dcad-e2e", "champion")
    assert str(version.version) == "3" and version.tags["dcad.gate.champion.against"] == "1"
    loaded = run_dcad(capsys, "eval", "models:/dcad-e2e@champion", "--data", str(trained.data), "--tracking-uri", uri, "--device", "cpu")
    assert loaded.code == 0


def test_losing_the_server_during_training_keeps_the_model_and_says_how_to_log_it(tmp_path, trained, capsys, monkeypatch):
    from dcad.platform import tracking

    monkeypatch.setenv("DCAD_TRACKING_WAIT_S", "3")  # the server does not come back while this command runs
    port = free_port()
    with mlflow_server(tmp_path / "server", port=port) as server:
        original = tracking.RunTracker.log_epoch

        def log_then_lose_server(self, report):
            original(self, report)
            server.stop()  # the server dies after the first epoch was logged

        monkeypatch.setattr(tracking.RunTracker, "log_epoch", log_then_lose_server)
        quick = ["--set", "train.base.iters_per_epoch=3", "--set", "ablation.mode=base_only", "--set", f"data.categories=[{CATEGORIES[0]}]"]
        result = run_dcad(capsys, *train_args(trained.data, tmp_path / "model", "--tracking-uri", server.url, "--experiment", "lost", *quick))
    monkeypatch.undo()
    assert result.code == 3
    message = result.err.strip().splitlines()[-1]
    assert "failed during the run" in message and "connection refused" in message and str(tmp_path / "model") in message and "dcad log" in message
    assert (tmp_path / "model" / "base" / "model.safetensors").is_file() and (tmp_path / "model" / "report" / "roc.png").is_file()
    command = message[message.index("dcad log"):].split()
    assert command[:3] == ["dcad", "log", str(tmp_path / "model")]

    with mlflow_server(tmp_path / "server", port=port) as server:  # back, same database
        relogged = run_dcad(capsys, *command[1:])
        assert relogged.code == 0, relogged.err
        client = mlflow_client(server.url)
        run_id = command[command.index("--run-id") + 1]
        run = client.get_run(run_id)
        assert run.info.status == "FINISHED" and run.outputs.model_outputs
        assert [m.step for m in client.get_metric_history(run_id, "base_train_loss")] == [1, 2]  # no duplicate of epoch 1
        assert "test_image_auroc" in run.data.metrics

