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
    from dcad.platform.ray_worker import file_sizes

    meta = {"epoch": 1, "total_epochs": 1, "final": True, "mlflow_run_id": "abc", "history": history,
            "val_metrics": {"val_image_auroc": 0.75}, "files": file_sizes(run / "final")}
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


def test_a_final_checkpoint_missing_a_file_is_refused_in_one_line(finished_run, tmp_path):
    """Storage that lost part of the final checkpoint (an upload cut short): refused, naming the file."""
    from dcad.platform.ray_train import RayTrainingError, RayTrainOptions, plan_run, train_on_ray

    cfg, _, storage = finished_run
    weights = storage / "done" / "final" / "model" / "base" / "model.safetensors"
    size = weights.stat().st_size
    weights.write_bytes(weights.read_bytes()[: size // 2])
    plan = plan_run(RayTrainOptions(2, storage=str(storage), name="done"), tmp_path / "out")
    with pytest.raises(RayTrainingError, match=rf"final checkpoint is incomplete \(model/base/model.safetensors has "
                                               rf"{size // 2} bytes, expected {size}\)"):
        train_on_ray(cfg, tmp_path / "data-not-needed", plan, log=lambda line: None)


def test_missing_files_names_the_first_file_absent_or_short(tmp_path):
    from dcad.platform.ray_worker import file_sizes, missing_files

    (tmp_path / "a.pt").write_bytes(b"x" * 10)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.pt").write_bytes(b"y" * 5)
    meta = {"files": file_sizes(tmp_path)}
    assert meta["files"] == {"a.pt": 10, "sub/b.pt": 5}
    assert missing_files(tmp_path, meta) is None
    assert missing_files(tmp_path, {}) is None  # a checkpoint from before the list: trusted as before
    (tmp_path / "sub" / "b.pt").unlink()
    assert missing_files(tmp_path, meta) == "sub/b.pt is missing"


def test_worker_temp_dirs_of_dead_processes_are_removed(tmp_path, monkeypatch):
    """A worker killed with its node never cleans up: the next worker on that host removes what it left."""
    import os
    import subprocess
    import tempfile

    from dcad.platform.ray_worker import worker_temp_dir

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    left = tmp_path / f"dcad-rank0-{dead.pid}-abc"
    live = tmp_path / f"dcad-rank0-{os.getpid()}-def"
    other = tmp_path / f"dcad-rank1-{dead.pid}-ghi"  # another kind: left to its own kind's next worker
    for directory in (left, live, other):
        directory.mkdir()
        (directory / "base.pt").write_bytes(b"x")
    fresh = worker_temp_dir("rank0")
    assert fresh.is_dir() and fresh.name.startswith(f"dcad-rank0-{os.getpid()}-")
    assert not left.exists() and live.exists() and other.exists()
