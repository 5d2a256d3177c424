"""The local path of `pipelines/quickstart.yaml` on a sqlite store: synth → train → evaluate → register → gated
promotion, each step fed by the one before; a --resume afterwards runs nothing and creates no run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fixtures_mlflow import run_dcad

pytestmark = pytest.mark.slow

PIPELINE = """
name: local-train
work_dir: {work}
tracking_uri: sqlite:///{store}/mlflow.db
experiment: local-train
device: cpu
steps:
  - {{name: data, kind: synth, seed: 0, size: 32, categories: [brick], train: 8, test: 4}}
  - name: train
    kind: train
    profile: tiny
    overrides:
      data.image_size: 32
      ablation.mode: base_only          # the steps are under test here, not the refiner (test_stack_e2e trains it)
      train.base.epochs: 1
      train.base.iters_per_epoch: 4
  - {{name: evaluate, kind: evaluate, model: "${{steps.train.model_uri}}", require: {{image_auroc: 0.0}}}}
  - {{name: register, kind: register, model_name: local-model}}
  - {{name: promote, kind: promote, model_name: local-model, alias: champion, floor: 0.0}}  # a 1-epoch smoke model: the floor has its own tests
"""


def test_train_register_promote_on_a_local_store(tmp_path, capsys, monkeypatch):
    from dcad.platform.mlflow_store import mlflow_client

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    spec = tmp_path / "pipeline.yaml"
    spec.write_text(PIPELINE.format(work=tmp_path / "work", store=tmp_path / "store"))
    result = run_dcad(capsys, "pipeline", "run", str(spec), "--json")
    assert result.code == 0, result.err[-3000:]
    steps = {s["name"]: s for s in json.loads(result.out)["steps"]}
    with capsys.disabled():
        print("\n[pipeline train] step seconds:", {name: step["seconds"] for name, step in steps.items()})
    train = steps["train"]["outputs"]
    assert train["data"] == steps["data"]["outputs"]["data"], "the train step read the synth step's dataset"
    assert Path(train["model_dir"], "metrics.json").is_file() and Path(train["model_dir"], "report").is_dir()

    evaluation = json.loads(Path(steps["evaluate"]["outputs"]["metrics_file"]).read_text())
    assert evaluation["model"] == train["model_uri"] and set(evaluation["categories"]) == {"brick"}
    assert all(0.0 <= v <= 1.0 for v in evaluation["mean"].values() if v is not None)

    client = mlflow_client(f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}")
    run = client.get_run(train["run_id"])
    assert run.info.status == "FINISHED" and run.data.tags["dcad.pipeline"] == "local-train"
    assert run.data.tags["dcad.model_uri"] == train["model_uri"] and "test_image_auroc" in run.data.metrics
    assert steps["register"]["outputs"] == {"model_name": "local-model", "version": "1", "run_id": train["run_id"]}
    assert steps["promote"]["outputs"]["decision"] == "first"
    assert client.get_model_version_by_alias("local-model", "champion").run_id == train["run_id"]

    runs_before = len(client.search_runs([run.info.experiment_id]))
    again = run_dcad(capsys, "pipeline", "run", str(spec), "--resume", "--json")
    assert again.code == 0, again.err[-2000:]
    assert {s["action"] for s in json.loads(again.out)["steps"]} == {"skip"}
    assert len(client.search_runs([run.info.experiment_id])) == runs_before, "a resumed, finished pipeline trains nothing"
