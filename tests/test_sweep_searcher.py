"""`SweepSearch` on a sqlite Optuna study, without Ray running: what each Tune call leaves in the study, and a
searcher saved and restored (as Tune does on `--resume`) telling a trial suggested before it was saved."""

from __future__ import annotations

import json
import logging
import pickle

import optuna
import pytest
from optuna.trial import TrialState

from dcad.platform.errors import PlatformError
from dcad.platform.sweep.reporting import DONE_KEY
from dcad.platform.sweep.search import RAY_TRIAL_ID, SearchSpace, SweepSearch, decode_params

PARAMS = {
    "refiner.class_conditioning": {"type": "categorical", "choices": [True, False]},
    "refiner.guidance_scale": {"type": "float", "low": 0.5, "high": 3.0, "log": True,
                               "when": {"refiner.class_conditioning": True}},
    "refiner.timesteps": {"type": "categorical", "choices": [[50], [100, 250]]},
    "refiner.groups": {"type": "int", "low": 2, "high": 4, "step": 1, "log": False},
}
MULTI = (["val_pixel_auroc", "ms_per_image"], ["max", "min"])
SINGLE = ("val_pixel_auroc", "max")


def searcher(tmp_path, metric, mode, name="unit") -> SweepSearch:
    return SweepSearch(space=SearchSpace(PARAMS), metric=metric, mode=mode,
                       sampler=optuna.samplers.RandomSampler(seed=0), study_name=name,
                       storage=f"sqlite:///{tmp_path / 'optuna.db'}")


def load(tmp_path, name="unit") -> optuna.Study:
    return optuna.load_study(study_name=name, storage=f"sqlite:///{tmp_path / 'optuna.db'}")


def done(**metrics) -> dict:
    return {**metrics, DONE_KEY: 1.0, "epoch": 4}


@pytest.mark.parametrize("metric, mode", [SINGLE, MULTI], ids=["single", "multi"])
def test_trials_are_told_complete_pruned_or_failed(tmp_path, metric, mode, caplog):
    search = searcher(tmp_path, metric, mode)
    configs = {tid: search.suggest(tid) for tid in ("t1", "t2", "t3")}
    for config in configs.values():  # flat, dotted keys; list choices as JSON text, decoded by the trial
        assert set(config) <= set(PARAMS) and {"refiner.class_conditioning", "refiner.timesteps"} <= set(config)
        assert ("refiner.guidance_scale" in config) == config["refiner.class_conditioning"]
        assert isinstance(config["refiner.timesteps"], str)
        assert decode_params(config)["refiner.timesteps"] == json.loads(config["refiner.timesteps"])
    study = load(tmp_path)
    assert [t.user_attrs[RAY_TRIAL_ID] for t in study.trials] == ["t1", "t2", "t3"]
    assert [t.params for t in study.trials] == list(configs.values())
    assert all(t.state == TrialState.RUNNING for t in study.trials)

    search.on_trial_result("t1", {"val_pixel_auroc": 0.1, "ms_per_image": 9.0, "epoch": 1})  # no intermediate values
    search.on_trial_complete("t1", done(val_pixel_auroc=0.8, ms_per_image=12.5))
    search.on_trial_complete("t2", {"val_pixel_auroc": 0.3, "ms_per_image": float("nan"), "epoch": 3})  # ASHA stop
    search.on_trial_complete("t3", None, error=True)
    with caplog.at_level(logging.DEBUG, logger="dcad.platform.sweep.search"):
        search.on_trial_complete("nobody", done(val_pixel_auroc=0.9, ms_per_image=1.0))
        search.on_trial_complete("t1", done(val_pixel_auroc=0.1, ms_per_image=1.0))  # told once only
    assert "nobody" in caplog.text

    trials = load(tmp_path).trials
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL]
    assert trials[0].values == ([0.8, 12.5] if isinstance(metric, list) else [0.8])
    assert trials[1].values is None and trials[2].values is None  # never the partial value
    assert all(not t.intermediate_values for t in trials)


def test_a_done_trial_without_its_objective_fails_and_tell_errors_do_not_raise(tmp_path, caplog):
    search = searcher(tmp_path, *MULTI)
    search.suggest("t1")
    search.suggest("t2")
    with caplog.at_level(logging.WARNING):
        search.on_trial_complete("t1", done(val_pixel_auroc=0.8))  # ms_per_image missing
    assert "t1" in caplog.text
    load(tmp_path).tell(1, state=TrialState.FAIL)  # told behind the searcher's back
    with caplog.at_level(logging.WARNING):
        search.on_trial_complete("t2", done(val_pixel_auroc=0.8, ms_per_image=1.0))  # logged, not raised
    assert "t2 not recorded as COMPLETE" in caplog.text
    assert [t.state for t in load(tmp_path).trials] == [TrialState.FAIL, TrialState.FAIL]


@pytest.mark.parametrize("metric, mode", [SINGLE, MULTI], ids=["single", "multi"])
def test_restored_searcher_tells_a_trial_suggested_before_it_was_saved(tmp_path, metric, mode):
    first = searcher(tmp_path, metric, mode)
    config = first.suggest("t1")
    first.suggest("t2")
    first.on_trial_complete("t1", done(val_pixel_auroc=0.7, ms_per_image=3.0))
    first.save(str(tmp_path / "searcher-state.pkl"))
    first_started = load(tmp_path).trials[0].datetime_start
    # Ctrl-C: "t2" is never told, it stays RUNNING; the resumed sweep unpickles the searcher Tune saved
    # with the experiment (tuner.pkl, taken when it started) and restores its state from the checkpoint
    second = pickle.loads(pickle.dumps(searcher(tmp_path, metric, mode)))
    second.restore(str(tmp_path / "searcher-state.pkl"))
    assert second.suggest("t1") == config  # no new Optuna trial for a known trial id
    second.on_trial_complete("t2", done(val_pixel_auroc=0.9, ms_per_image=2.0))
    second.on_trial_complete("t1", done(val_pixel_auroc=0.1, ms_per_image=9.0))  # finished before: not told again
    second.suggest("t3")

    study = load(tmp_path)
    assert study.trials[0].datetime_start == first_started  # the same study, continued
    assert [(t.number, t.user_attrs[RAY_TRIAL_ID], t.state) for t in study.trials] == [
        (0, "t1", TrialState.COMPLETE), (1, "t2", TrialState.COMPLETE), (2, "t3", TrialState.RUNNING)]
    assert study.trials[0].values[0] == 0.7 and study.trials[1].values[0] == 0.9


def test_trial_ids_are_rebuilt_from_the_study(tmp_path):
    """A searcher whose saved state lacks a trial (suggested after the last save) still tells it."""
    first = searcher(tmp_path, *SINGLE)
    first.save(str(tmp_path / "searcher-state.pkl"))
    first.suggest("t1")
    second = searcher(tmp_path, *SINGLE)
    second.restore(str(tmp_path / "searcher-state.pkl"))
    second.on_trial_complete("t1", done(val_pixel_auroc=0.6))
    assert [(t.state, t.values) for t in load(tmp_path).trials] == [(TrialState.COMPLETE, [0.6])]


def test_search_properties_keep_what_is_set(tmp_path):
    search = searcher(tmp_path, *SINGLE)
    assert search.set_search_properties("other", "min", {}) is True
    assert (search.metric, search.mode) == SINGLE
    assert search.set_search_properties(None, None, {"x": 1}) is False  # a Tune param_space is not taken
    late = SweepSearch(space=SearchSpace(PARAMS), study_name="late", storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    with pytest.raises(RuntimeError, match="metric and mode"):
        late.suggest("t1")
    assert late.set_search_properties(*MULTI, {}) is True
    late.suggest("t1")
    assert load(tmp_path, "late").directions == [optuna.study.StudyDirection.MAXIMIZE,
                                                 optuna.study.StudyDirection.MINIMIZE]


def test_build_searcher_on_a_bad_storage_is_one_line(tmp_path):
    from dcad.platform.sweep.search import build_searcher
    from dcad.platform.sweep.spec import parse_sweep_spec

    spec = parse_sweep_spec({"name": "unit", "base": {"profile": "tiny"}, "dataset": "data/synth",
                             "search_space": {"refiner.groups": PARAMS["refiner.groups"]},
                             "objective": [{"metric": "val_pixel_auroc", "mode": "max"}]})
    with pytest.raises(PlatformError) as info:
        build_searcher(spec, "nosuchdb://nowhere")
    assert "cannot open the Optuna storage" in str(info.value) and "\n" not in str(info.value)
    search = build_searcher(spec, f"sqlite:///{tmp_path / 'db' / 'optuna.db'}")
    assert isinstance(search, SweepSearch) and search.storage_url.endswith("optuna.db")
    search.suggest("t1")
    assert load(tmp_path / "db").trials[0].user_attrs[RAY_TRIAL_ID] == "t1"


def test_saved_and_restored_through_tunes_wrappers(tmp_path):
    """As Tune does it: the searcher wrapped in ConcurrencyLimiter and SearchGenerator, cloudpickled with the
    Tuner (`tuner.pkl`), saved with `save_to_dir` and restored with `restore_from_dir`. No Ray is started."""
    import ray.cloudpickle as cloudpickle
    from ray.tune.search import ConcurrencyLimiter, SearchGenerator

    def wrapped(search):
        return SearchGenerator(ConcurrencyLimiter(search, max_concurrent=2))

    tuner_pkl = cloudpickle.dumps(searcher(tmp_path, *MULTI))
    first = cloudpickle.loads(tuner_pkl)
    gen = wrapped(first)
    gen.searcher.suggest("t1")  # through the limiter, as SearchGenerator.create_trial asks
    gen.searcher.suggest("t2")
    gen.searcher.on_trial_complete("t1", done(val_pixel_auroc=0.5, ms_per_image=4.0))
    (tmp_path / "exp").mkdir()
    gen.save_to_dir(str(tmp_path / "exp"), session_str="2024-01-01_00-00-00")
    assert list((tmp_path / "exp").glob("searcher-state-*.pkl"))

    second = cloudpickle.loads(tuner_pkl)
    gen2 = wrapped(second)
    assert gen2.has_checkpoint(str(tmp_path / "exp"))
    gen2.restore_from_dir(str(tmp_path / "exp"))
    gen2.on_trial_complete("t2", done(val_pixel_auroc=0.9, ms_per_image=2.0))
    assert [(t.user_attrs[RAY_TRIAL_ID], t.state, t.values) for t in load(tmp_path).trials] == [
        ("t1", TrialState.COMPLETE, [0.5, 4.0]), ("t2", TrialState.COMPLETE, [0.9, 2.0])]
