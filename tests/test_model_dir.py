"""The model directory: components with their configs, strict loading, atomic writes, format versions."""

import json
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

from dcad.core.config import load_config
from dcad.core.errors import ModelError
from dcad.core.model.drdc import DRDC
from dcad.core.model.model_dir import FORMAT_VERSION, load_model, read_metadata, save_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny_model(*overrides: str) -> DRDC:
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = DRDC(load_config("tiny", overrides=list(overrides)), ["a", "b"]).eval()
    cal = model.calibration
    cal.base_mean.fill_(0.5)
    t, s = len(model.cfg.refiner.timesteps), len(model.cfg.refiner.patch_sizes)
    cal.refine.fit([(torch.rand(4, t, s, 64, 64), torch.tensor([0, 1, 0, 1]))])
    cal.image_threshold.fill_(1.25)
    cal.pixel_threshold.fill_(2.5)
    return model


def outputs(model: DRDC):
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    pred = model(images, torch.tensor([0, 1]))
    return pred.anomaly_map, pred.image_score


def test_round_trip_by_component_gives_identical_outputs(tmp_path):
    model = tiny_model()
    save_model(model, tmp_path / "m", extra={"dataset_digest": "abc"})
    for name in ("backbone", "base", "prototypes", "calibration", "denoiser"):
        assert (tmp_path / "m" / name / "config.json").is_file() and (tmp_path / "m" / name / "model.safetensors").is_file()
    assert json.loads((tmp_path / "m" / "scheduler" / "scheduler_config.json").read_text())["_class_name"] == "DDIMScheduler"
    meta = read_metadata(tmp_path / "m")
    assert meta["format_version"] == FORMAT_VERSION == 2 and meta["image_threshold"] == 1.25 and meta["dataset_digest"] == "abc"
    assert not any("threshold" in k for k in load_file(str(tmp_path / "m" / "calibration" / "model.safetensors")))
    loaded = load_model(tmp_path / "m")
    assert loaded.calibration.pixel_threshold.item() == 2.5
    for a, b in zip(outputs(model), outputs(loaded)):
        assert torch.equal(a, b)


def test_a_format_1_directory_loads_with_identical_outputs(tmp_path):
    model = tiny_model()
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    state["calibration.image_threshold"], state["calibration.pixel_threshold"] = torch.tensor(1.25), torch.tensor(2.5)
    save_file(state, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.yaml").write_text(model.cfg.to_yaml())
    (tmp_path / "dcad_model.json").write_text(json.dumps({"format": "dcad-model", "format_version": 1, "categories": ["a", "b"],
                                                          "image_threshold": 1.25, "pixel_threshold": 2.5}))
    loaded = load_model(tmp_path)
    for a, b in zip(outputs(model), outputs(loaded)):
        assert torch.equal(a, b)


def test_saving_again_keeps_other_files_and_leaves_no_temporary_directory(tmp_path):
    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    (out / "checkpoints" / "base.pt").write_text("state")
    (out / "metrics.json").write_text("{}")
    save_model(tiny_model(), out)
    save_model(tiny_model("refiner.enabled=false"), out)
    assert (out / "checkpoints" / "base.pt").read_text() == "state" and (out / "metrics.json").is_file()
    assert not (out / "denoiser").exists() and not (out / "scheduler").exists(), "the old model's files are gone"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
    assert load_model(out).denoiser is None


def test_a_failed_write_leaves_the_old_model(tmp_path, monkeypatch):
    out = tmp_path / "run"
    save_model(tiny_model(), out)
    before = (out / "base" / "model.safetensors").read_bytes()
    monkeypatch.setattr("dcad.core.model.model_dir._metadata", lambda *a: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        save_model(tiny_model("base.hidden_dim=16"), out)
    assert (out / "base" / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_components_load_strictly(tmp_path):
    save_model(tiny_model(), tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "base" / "config.json").read_text())
    (tmp_path / "m" / "base" / "config.json").write_text(json.dumps({**cfg, "hidden_dim": 8}))
    with pytest.raises(ModelError, match=r"do not match the config \(base.hidden_dim is 8"):
        load_model(tmp_path / "m")
    (tmp_path / "m" / "base" / "config.json").write_text(json.dumps(cfg))
    path = tmp_path / "m" / "calibration" / "model.safetensors"
    save_file({**load_file(str(path)), "stray": torch.zeros(1)}, str(path))
    with pytest.raises(ModelError, match="calibration: .*stray") as err:
        load_model(tmp_path / "m")
    assert "\n" not in str(err.value)


def test_an_unknown_format_version_is_refused_in_one_line(tmp_path):
    save_model(tiny_model(), tmp_path / "m")
    meta = json.loads((tmp_path / "m" / "dcad_model.json").read_text())
    (tmp_path / "m" / "dcad_model.json").write_text(json.dumps({**meta, "format_version": 7}))
    with pytest.raises(ModelError, match="model format version 7 is not supported") as err:
        load_model(tmp_path / "m")
    assert "\n" not in str(err.value)
