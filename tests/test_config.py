import subprocess
import sys

import pytest

from dcad.core.config import PROFILES, ConfigError, DCADConfig, load_config


@pytest.mark.parametrize("name", PROFILES)
def test_profiles_load_and_name_themselves(name):
    cfg = load_config(profile=name)
    assert cfg.profile == name
    assert cfg.data.image_size % cfg.backbone.feature_stride == 0


def test_profiles_scale_up():
    tiny, cpu, paper = (load_config(profile=p) for p in PROFILES)
    assert tiny.data.image_size < cpu.data.image_size < paper.data.image_size
    assert paper.backbone.name == "efficientnet_b4"


def test_dotted_overrides_are_typed():
    cfg = load_config(profile="tiny", overrides=["refiner.guidance_scale=1.5", "refiner.timesteps=[50, 200]"])
    assert cfg.refiner.guidance_scale == 1.5
    assert cfg.refiner.timesteps == [50, 200]


def test_unknown_key_is_named():
    with pytest.raises(ConfigError, match=r"unknown key 'refiner\.guidanse_scale'"):
        load_config(profile="tiny", overrides=["refiner.guidanse_scale=2"])


def test_wrong_type_is_named():
    with pytest.raises(ConfigError, match=r"'train\.base\.epochs'"):
        load_config(profile="tiny", overrides=["train.base.epochs=many"])


def test_override_into_a_leaf_is_refused():
    with pytest.raises(ConfigError, match="not a section"):
        load_config(profile="tiny", overrides=["data.image_size.x=3"])


def test_unknown_profile():
    with pytest.raises(ConfigError, match="unknown profile 'huge'"):
        load_config(profile="huge")


def test_yaml_file_with_profile_base(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text("profile: tiny\nrefiner:\n  groups: 4\n")
    cfg = load_config(config_path=path)
    assert cfg.refiner.groups == 4
    assert cfg.data.image_size == load_config(profile="tiny").data.image_size


def test_bad_yaml_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("refiner: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        DCADConfig.from_yaml(path)
    path.write_text("backbone:\n  feature_stride: 12\n")
    with pytest.raises(ConfigError, match="backbone.feature_stride"):
        DCADConfig.from_yaml(path)


def test_round_trip_and_flat():
    cfg = load_config(profile="cpu")
    again = DCADConfig.model_validate(__import__("yaml").safe_load(cfg.to_yaml()))
    assert again == cfg
    flat = cfg.flat()
    assert flat["refiner.scheduler.beta_schedule"] == cfg.refiner.scheduler.beta_schedule


def test_cli_version_and_config_error_exit_code(tmp_path):
    out = subprocess.run([sys.executable, "-m", "dcad.cli.app", "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.startswith("dcad ")
    bad = subprocess.run(
        [sys.executable, "-m", "dcad.cli.app", "train", "--data", str(tmp_path), "--output", str(tmp_path / "o"),
         "--profile", "tiny", "--set", "nope.x=1"],
        capture_output=True, text=True,
    )
    assert bad.returncode == 2
    assert "unknown key 'nope'" in bad.stderr
    assert "Traceback" not in bad.stderr


def test_the_scheduler_section_names_a_class_and_its_arguments(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("profile: tiny\nrefiner:\n  scheduler:\n    class_name: DDPMScheduler\n    num_train_timesteps: 500\n"
                    "    variance_type: fixed_large\n")
    cfg = load_config(config_path=path)
    assert cfg.refiner.scheduler.class_name == "DDPMScheduler"
    assert cfg.refiner.scheduler.scheduler_kwargs()["variance_type"] == "fixed_large"
    assert load_config(profile="tiny").refiner.scheduler.class_name == "DDIMScheduler"  # the existing keys as before
    assert DCADConfig.from_yaml(path).flat()["refiner.scheduler.num_train_timesteps"] == 500


def test_configs_written_with_retired_keys_still_load():
    data = load_config(profile="tiny").model_dump(mode="json")
    data["data"]["num_workers"] = 4
    assert "num_workers" not in DCADConfig.from_dict(data).data.model_dump()
