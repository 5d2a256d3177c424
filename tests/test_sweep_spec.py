"""Sweep specs: the shipped ones validate, bad ones fail with one line naming the key; the define-by-run
space honours conditions; best trial and Pareto front use the objectives only. No Ray here."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import yaml

from dcad.platform.sweep import SweepSpecError, load_sweep_spec
from dcad.platform.sweep.reporting import TrialRecord, best_trial, pareto_front
from dcad.platform.sweep.search import SearchSpace, active, decode_params
from dcad.platform.sweep.spec import parse_sweep_spec

SWEEPS = Path(__file__).resolve().parents[1] / "sweeps"

BASE = {
    "name": "unit",
    "base": {"profile": "tiny", "overrides": {"train.base.epochs": 2}},
    "dataset": "data/synth",
    "search_space": {
        "refiner.class_conditioning": {"type": "categorical", "choices": [True, False]},
        "refiner.guidance_scale": {"type": "float", "low": 0.5, "high": 3.0, "log": True,
                                   "when": {"refiner.class_conditioning": True}},
        "refiner.timesteps": {"type": "categorical", "choices": [[50], [100, 250]]},
        "refiner.groups": {"type": "int", "low": 2, "high": 4},
    },
    "objective": [{"metric": "val_pixel_auroc", "mode": "max"}, {"metric": "ms_per_image", "mode": "min"}],
    "early_stopping": {"grace_period": 3, "max_t": 4},  # tiny: 2 base epochs (override) + 2 refiner epochs
}


def spec_with(**changes):
    data = copy.deepcopy(BASE)
    for dotted, value in changes.items():
        node = data
        *path, last = dotted.split("/")
        for part in path:
            node = node[part]
        if value is None:
            node.pop(last)
        else:
            node[last] = value
    return data


def error_of(data) -> str:
    with pytest.raises(SweepSpecError) as info:
        parse_sweep_spec(data, "bad.yaml")
    message = str(info.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize("path", sorted(SWEEPS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_spec_validates(path):
    spec = load_sweep_spec(path)
    assert spec.name == path.stem
    for key in spec.search_space:  # every swept key really changes the trial's config
        cfg = spec.base_config()
        probe = spec.search_space[key].probes()[-1]
        changed = spec.base_config({key: probe}).flat()
        assert changed[key] == (probe if not isinstance(probe, float) else pytest.approx(probe)), key
        assert key in cfg.flat()
    assert all(not o.metric.startswith("test_") for o in spec.objective)


def test_shipped_specs_cover_the_issue():
    names = {p.stem for p in SWEEPS.glob("*.yaml")}
    assert {"quickstart", "conditioning", "noise-schedule", "paper-gpu"} <= names
    cond = load_sweep_spec(SWEEPS / "conditioning.yaml").search_space
    assert {"refiner.guidance_scale", "refiner.cond_dropout", "refiner.class_conditioning", "refiner.base_map_channel",
            "refiner.patch_sizes", "refiner.groups"} <= set(cond)
    noise = load_sweep_spec(SWEEPS / "noise-schedule.yaml").search_space
    assert {"refiner.scheduler.beta_schedule", "refiner.scheduler.beta_start", "refiner.scheduler.beta_end",
            "refiner.scheduler.num_train_timesteps", "refiner.timesteps", "refiner.scheduler.prediction_type"} <= set(noise)
    paper = load_sweep_spec(SWEEPS / "paper-gpu.yaml")
    assert paper.base.profile == "paper" and paper.resources.gpus_per_worker > 0


def test_noise_schedule_timesteps_fit_every_schedule_length():
    noise = load_sweep_spec(SWEEPS / "noise-schedule.yaml").search_space
    shortest = min(noise["refiner.scheduler.num_train_timesteps"].choices)
    assert max(max(c) for c in noise["refiner.timesteps"].choices) < shortest


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"search_space/refiner.guidanse_scale": {"type": "float", "low": 0, "high": 1}},
         r"search_space\.refiner\.guidanse_scale: 'guidanse_scale' is not a field of refiner"),
        ({"search_space/refiner.scheduler": {"type": "categorical", "choices": [1]}},
         r"search_space\.refiner\.scheduler: is a section"),
        ({"search_space/refiner.scheduler.beta_end": {"type": "float", "low": 0.01, "high": 1.5}},
         r"search_space\.refiner\.scheduler\.beta_end: value 1\.5 is refused by the config"),
        ({"search_space/refiner.scheduler.beta_schedule": {"type": "categorical", "choices": ["linear", "cosine"]}},
         r"search_space\.refiner\.scheduler\.beta_schedule: value 'cosine' is refused"),
        ({"search_space/refiner.groups": {"type": "int", "low": 4, "high": 2}},
         r"'search_space\.refiner\.groups': low \(4\) must be below high \(2\)"),
        ({"search_space/refiner.guidance_scale/low": 0.0},
         r"'search_space\.refiner\.guidance_scale': a log-scale range needs low > 0"),
        ({"search_space/refiner.guidance_scale/when": {"refiner.nope": True}},
         r"search_space\.refiner\.guidance_scale\.when: 'refiner\.nope' is not an earlier parameter"),
        ({"search_space/refiner.guidance_scale/when": {"refiner.groups": 3}},
         r"'refiner\.groups' is not an earlier parameter of the search space \(it must come before this one\)"),
        ({"search_space/refiner.guidance_scale/when": {"refiner.class_conditioning": "yes"}},
         r"\['yes'\] not among the choices of 'refiner\.class_conditioning'"),
        ({"objective": [{"metric": "test_pixel_auroc", "mode": "max"}]},
         r"'objective\.0\.metric': 'test_pixel_auroc' is a test-split metric"),
        ({"objective": [{"metric": "pixel_auroc", "mode": "max"}]}, r"'objective\.0\.metric': 'pixel_auroc'"),
        ({"objective": [{"metric": "val_image_auroc", "mode": "up"}]}, r"'objective\.0\.mode'"),
        ({"sampler": {"type": "cmaes"}}, r"'sampler\.type': cmaes handles one objective only"),
        ({"sampler": {"type": "grid"}}, r"'sampler\.type'"),
        ({"objective": [{"metric": "ms_per_image", "mode": "min"}]}, r"ASHA needs a validation metric"),
        ({"early_stopping": {"grace_period": 6, "max_t": 5}}, r"grace_period \(6\) must not exceed max_t \(5\)"),
        ({"early_stopping": {"grace_period": 2, "max_t": 4}},
         r"'early_stopping\.grace_period': 2 is within the 2 base-branch epochs.*use grace_period >= 3"),
        ({"early_stopping": {"grace_period": 5, "max_t": 6}}, r"'early_stopping\.grace_period': 5 exceeds the 4 epochs a trial trains"),
        ({"base/overrides": {"train.base.epochs": 2, "train.validate_refiner": False}},
         r"'early_stopping': train\.validate_refiner is false"),
        ({"base": {"profile": "huge"}}, r"'base': unknown profile 'huge'"),
        ({"base/overrides": {"train.base.epochs": 0}}, r"base config: .*'train\.base\.epochs'"),
        ({"resources": {"workers": 0}}, r"'resources\.workers'"),
        ({"name": "has space"}, r"'name': 'has space'"),
        ({"colour": "red"}, r"unknown key 'colour'"),
        ({"dataset": None}, r"missing key 'dataset'"),
    ],
)
def test_bad_specs_fail_with_one_line_naming_the_key(changes, expected):
    message = error_of(spec_with(**changes))
    assert message.startswith("bad.yaml: ")
    assert __import__("re").search(expected, message), message


def test_early_stopping_may_start_early_when_the_base_branch_is_swept():
    data = spec_with(early_stopping={"grace_period": 1, "max_t": 4})
    data["search_space"]["base.hidden_dim"] = {"type": "categorical", "choices": [32, 64]}
    assert parse_sweep_spec(data).early_stopping.grace_period == 1


def test_unreadable_and_non_mapping_files(tmp_path):
    with pytest.raises(SweepSpecError, match="cannot read sweep spec"):
        load_sweep_spec(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(SweepSpecError, match="not valid YAML"):
        load_sweep_spec(bad)
    bad.write_text("- a\n- b\n")
    with pytest.raises(SweepSpecError, match="top level must be a mapping"):
        load_sweep_spec(bad)


def test_config_file_base_is_relative_to_the_spec(tmp_path):
    (tmp_path / "base.yaml").write_text("profile: tiny\ntrain:\n  base: {epochs: 7}\n")
    data = spec_with(base={"config": "base.yaml"}, early_stopping=None)
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(data))
    spec = load_sweep_spec(path)
    assert spec.base_config().train.base.epochs == 7
    assert spec.base_config({"refiner.groups": 3}).refiner.groups == 3


def test_define_by_run_space_samples_conditions_and_list_choices():
    import optuna

    spec = parse_sweep_spec(spec_with())
    space = SearchSpace.from_spec(spec)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    seen_conditioning = set()
    for _ in range(24):
        trial = study.ask()
        space(trial)
        params = decode_params(trial.params)
        conditioned = params["refiner.class_conditioning"]
        seen_conditioning.add(conditioned)
        assert ("refiner.guidance_scale" in params) == conditioned
        if conditioned:
            assert 0.5 <= params["refiner.guidance_scale"] <= 3.0
        assert params["refiner.timesteps"] in ([50], [100, 250])
        assert params["refiner.groups"] in (2, 3, 4)
        cfg = spec.base_config(params)  # every sample is a valid trial config
        assert cfg.refiner.timesteps == params["refiner.timesteps"]
        study.tell(trial, 0.5)
    assert seen_conditioning == {True, False}


def test_condition_with_several_allowed_values():
    assert active({"a": ["linear", "scaled_linear"]}, {"a": "linear"})
    assert not active({"a": ["linear", "scaled_linear"]}, {"a": "squaredcos_cap_v2"})
    assert not active({"a": True}, {})


def _record(tid: str, val: float, ms: float, test: float, status: str = "finished") -> TrialRecord:
    objectives = {"val_pixel_auroc": val, "ms_per_image": ms} if status == "finished" else {}
    return TrialRecord(tid, status, {}, f"run-{tid}", objectives, {"test_pixel_auroc": test, "val_pixel_auroc": val})


def test_best_trial_uses_validation_not_test():
    spec = parse_sweep_spec(spec_with(objective=[{"metric": "val_pixel_auroc", "mode": "max"}]))
    records = [_record("a", 0.90, 5, test=0.70), _record("b", 0.80, 5, test=0.99), _record("c", 0.95, 5, test=0.5, status="stopped")]
    for r in records:  # single objective: the record only has the validation objective
        r.objectives.pop("ms_per_image", None)
    best = best_trial(records, spec)
    assert best.trial_id == "a" and best.run_id == "run-a"  # not b (best on test), not c (stopped early)


def test_pareto_front_and_best_of_two_objectives():
    spec = parse_sweep_spec(spec_with())
    records = [
        _record("fast", 0.80, 1.0, 0.0),
        _record("good", 0.95, 9.0, 0.0),
        _record("dominated", 0.79, 2.0, 1.0),  # worse than "fast" on both
        _record("middle", 0.90, 4.0, 0.0),
        _record("failed", math.nan, 0.1, 1.0, status="failed"),
    ]
    front = {r.trial_id for r in pareto_front(records, spec)}
    assert front == {"fast", "good", "middle"}
    assert best_trial(records, spec).trial_id == "good"


def test_resumed_sweep_keeps_its_tracking_store(monkeypatch):
    from dcad.platform.sweep.runner import choose_tracking_uri
    from dcad.platform.sweep.state import SweepError, SweepState

    spec = parse_sweep_spec(spec_with(tracking_uri="sqlite:///spec.db"), "unit.yaml")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///env.db")
    assert choose_tracking_uri(spec, None, None) == "sqlite:///env.db"  # new sweep: env before the spec
    assert choose_tracking_uri(spec, None, "sqlite:///flag.db") == "sqlite:///flag.db"
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert choose_tracking_uri(spec, None, None) == "sqlite:///spec.db"
    state = SweepState("unit", "d", "sqlite:///study.db", "run1", "http://u:hunter2@mlflow:5000")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///env.db")
    assert choose_tracking_uri(spec, state, None) == state.tracking_uri  # the parent run's store wins
    assert choose_tracking_uri(spec, state, state.tracking_uri) == state.tracking_uri
    with pytest.raises(SweepError) as info:
        choose_tracking_uri(spec, state, "sqlite:///other.db")
    message = str(info.value)
    assert "keeps its store" in message and "other.db" in message and "hunter2" not in message
