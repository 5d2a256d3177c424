"""A restarted driver whose run already finished takes the final model from storage, without Ray."""

from __future__ import annotations

import json
import sys

import pytest
import torch


@pytest.fixture
def finished_run(tmp_path):
    """STORAGE/NAME with a committed `final` checkpoint, as a run that ended before its driver wrote OUTPUT."""
    from dcad.core.config import load_config
    from dcad.core.model.drdc import DRDC
    from dcad.core.model.model_dir import save_model

    cfg = load_config(profile="tiny", overrides={"ablation.mode": "base_only", "backbone.weights": "none"})
    torch.manual_seed(3)
    model = DRDC(cfg, ["brick", "grass"])
    model.calibration.image_threshold.fill_(0.25)
    run = tmp_path / "storage" / "done"
    save_model(model, run / "final" / "model")
    history = [{"stage": "base", "epoch": 1, "global_epoch": 1, "train_loss": 2.0}]
    meta = {"epoch": 1, "total_epochs": 1, "final": True, "mlflow_run_id": "abc", "history": history,
            "val_metrics": {"val_image_auroc": 0.75}}
    (run / "final" / "dcad_checkpoint.json").write_text(json.dumps(meta))
    snapshot = {"latest_checkpoint_result": {"checkpoint_dir_name": "final", "metrics": {}}}
    (run / "checkpoint_manager_snapshot.json").write_text(json.dumps(snapshot))
    return cfg, model, tmp_path / "storage"


def test_finished_run_is_loaded_from_storage_without_starting_ray(finished_run, tmp_path):
    from dcad.platform.ray_train import RayTrainOptions, plan_run, train_on_ray

    cfg, model, storage = finished_run
    plan = plan_run(RayTrainOptions(2, storage=str(storage), name="done"), tmp_path / "out")
    assert plan.previous_mlflow_run_id == "abc"  # the CLI reopens this MLflow run
    lines: list[str] = []
    outcome = train_on_ray(cfg, tmp_path / "data-not-needed", plan, log=lines.append)
    assert lines == [f"run 'done' already finished; using its final checkpoint (epoch 1/1) in {storage}/done"]
    assert outcome.val_metrics == {"val_image_auroc": 0.75}
    assert outcome.history[0]["train_loss"] == 2.0
    assert float(outcome.model.calibration.image_threshold) == 0.25
    for key, value in model.state_dict().items():
        assert torch.equal(value.nan_to_num(), outcome.model.state_dict()[key].nan_to_num()), key
    assert "ray" not in sys.modules or not sys.modules["ray"].is_initialized()
