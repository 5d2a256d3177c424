"""`dcad sweep --dry-run`, the checks made before Ray starts, and `dcad leaderboard --parent SWEEP --pareto`
(on a hand-made MLflow sweep). No Ray here."""

from __future__ import annotations

import json

import pytest
import yaml

from fixtures_mlflow import run_dcad, sqlite_uri

SPEC = {
    "name": "clitest",
    "base": {"profile": "tiny"},
    "search_space": {
        "refiner.class_conditioning": {"type": "categorical", "choices": [True, False]},
        "refiner.guidance_scale": {"type": "float", "low": 0.5, "high": 3.0, "log": True,
                                   "when": {"refiner.class_conditioning": True}},
    },
    "objective": [{"metric": "val_pixel_auroc", "mode": "max"}, {"metric": "ms_per_image", "mode": "min"}],
    "early_stopping": {"grace_period": 4, "max_t": 5},
    "num_trials": 3,
    "max_concurrent": 2,
    "resources": {"workers": 1, "cpus_per_worker": 0.5},
}


@pytest.fixture
def spec_file(tmp_path):
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    spec = {**SPEC, "dataset": str(data_dir), "storage": str(tmp_path / "sweeps")}
    path = tmp_path / "clitest.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_dry_run_prints_the_plan_without_starting_anything(spec_file, capsys, tmp_path):
    result = run_dcad(capsys, "sweep", str(spec_file), "--dry-run")
    assert result.code == 0, result.err
    out = " ".join(result.out.split())
    assert "sweep 'clitest' (new): 3 trials, at most 2 at a time" in out
    assert "resources per trial: 0.5 CPU, training in the trial itself" in out
    assert "stages: 1 base training, shared by every trial" in out
    assert "ASHA on val_pixel_auroc (max), grace 4, max_t 5 epochs" in out
    assert "refiner.guidance_scale: float [0.5, 3.0] log when {'refiner.class_conditioning': True}" in out
    assert "5 epochs per trial" in out  # the tiny profile: 3 base + 2 refiner epochs
    assert not (tmp_path / "sweeps").exists()  # nothing written


def test_a_spec_run_again_is_a_new_numbered_sweep_and_resume_takes_the_latest(spec_file, capsys):
    from dcad.platform.sweep import load_sweep_spec
    from dcad.platform.sweep.runner import numbered
    from dcad.platform.sweep.state import SweepState, spec_digest, sweep_dir

    missing = run_dcad(capsys, "sweep", str(spec_file), "--resume", "--dry-run")
    assert missing.code == 2
    assert "nothing to resume: no sweep 'clitest'" in missing.err and "Traceback" not in missing.err
    spec = load_sweep_spec(spec_file)
    sweep_dir(spec).write_state(SweepState(spec.name, spec_digest(spec), "sqlite:///x.db", "parent123"))
    again = " ".join(run_dcad(capsys, "sweep", str(spec_file), "--dry-run").out.split())
    assert "sweep 'clitest' has run before: this is a new sweep 'clitest-2'" in again and "--resume continues 'clitest'" in again
    assert "sweep 'clitest-2' (new)" in again
    ok = run_dcad(capsys, "sweep", str(spec_file), "--resume", "--dry-run")
    assert ok.code == 0 and "sweep 'clitest' (resume)" in " ".join(ok.out.split())

    second = numbered(spec, 2)
    sweep_dir(second).write_state(SweepState(second.name, spec_digest(spec), "sqlite:///x.db", "parent456"))
    third = " ".join(run_dcad(capsys, "sweep", str(spec_file), "--dry-run").out.split())
    assert "this is a new sweep 'clitest-3'" in third and "--resume continues 'clitest-2'" in third
    latest = run_dcad(capsys, "sweep", str(spec_file), "--resume", "--dry-run")
    assert "sweep 'clitest-2' (resume)" in " ".join(latest.out.split())


def test_a_changed_spec_cannot_resume(spec_file, capsys):
    from dcad.platform.sweep import load_sweep_spec
    from dcad.platform.sweep.state import SweepState, sweep_dir

    spec = load_sweep_spec(spec_file)
    sweep_dir(spec).write_state(SweepState(spec.name, "0" * 16, "sqlite:///x.db", "p"))
    result = run_dcad(capsys, "sweep", str(spec_file), "--resume", "--dry-run")
    assert result.code == 2 and "started from a different spec" in result.err


def test_missing_dataset_and_bad_spec_are_one_line(tmp_path, capsys):
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump({**SPEC, "dataset": str(tmp_path / "nowhere")}))
    result = run_dcad(capsys, "sweep", str(path), "--dry-run")
    assert result.code == 2 and "no such directory" in result.err and "dcad data synth" in result.err
    path.write_text(yaml.safe_dump({**SPEC, "dataset": "x", "objective": [{"metric": "test_image_auroc"}]}))
    result = run_dcad(capsys, "sweep", str(path), "--dry-run")
    assert result.code == 2 and "test-split metric" in result.err
    assert len(result.err.strip().splitlines()) == 1


# ---- leaderboard --pareto --------------------------------------------------------------------------
CHILDREN = {  # name: (val_pixel_auroc, ms_per_image)
    "fast": (0.80, 1.0),
    "accurate": (0.95, 9.0),
    "balanced": (0.90, 4.0),
    "dominated": (0.85, 5.0),  # worse than balanced on both
}


@pytest.fixture(scope="module")
def sweep_store(tmp_path_factory):
    from dcad.platform.mlflow_store import mlflow_client

    uri = sqlite_uri(tmp_path_factory.mktemp("sweep-store"))
    client = mlflow_client(uri)
    exp = client.create_experiment("sweeps")
    objectives = json.dumps([{"metric": "val_pixel_auroc", "mode": "max"}, {"metric": "ms_per_image", "mode": "min"}])
    parent = client.create_run(exp, run_name="s1", tags={"dcad.sweep": "s1", "dcad.kind": "sweep", "dcad.objectives": objectives})
    ids = {}
    for name, (val, ms) in CHILDREN.items():
        run = client.create_run(exp, run_name=name, tags={"mlflow.parentRunId": parent.info.run_id, "dcad.sweep": "s1"})
        client.log_metric(run.info.run_id, "val_pixel_auroc", val)
        client.log_metric(run.info.run_id, "ms_per_image", ms)
        client.log_metric(run.info.run_id, "test_pixel_auroc", 1.0 - val)
        client.set_terminated(run.info.run_id, "FINISHED")
        ids[name] = run.info.run_id
    # a trial whose process died (SIGKILL, OOM) after logging the best values: never on the front
    died = client.create_run(exp, run_name="died", tags={"mlflow.parentRunId": parent.info.run_id, "dcad.sweep": "s1"})
    client.log_metric(died.info.run_id, "val_pixel_auroc", 0.999)
    client.log_metric(died.info.run_id, "ms_per_image", 0.1)
    client.set_terminated(died.info.run_id, "FAILED")
    other = client.create_run(exp, run_name="outsider")  # not a child: never shown
    client.log_metric(other.info.run_id, "val_pixel_auroc", 0.99)
    client.log_metric(other.info.run_id, "ms_per_image", 0.5)
    return uri, parent.info.run_id, ids


def test_leaderboard_pareto_by_sweep_name_and_parent_id(sweep_store, capsys):
    uri, parent_id, ids = sweep_store
    for parent in ("s1", parent_id):
        result = run_dcad(capsys, "leaderboard", "--parent", parent, "--pareto", "--json", "--tracking-uri", uri)
        assert result.code == 0, result.err
        board = json.loads(result.out)
        assert board["pareto"] is True and board["metric"] == "val_pixel_auroc"
        assert [r["run_name"] for r in board["runs"]] == ["accurate", "balanced", "fast"]  # best first objective first
    table = run_dcad(capsys, "leaderboard", "--parent", "s1", "--pareto", "--tracking-uri", uri)
    assert "Pareto front" in table.out and "dominated" not in table.out and "died" not in table.out
    everything = run_dcad(capsys, "leaderboard", "--parent", "s1", "--pareto", "--unfinished", "--json", "--tracking-uri", uri)
    assert [r["run_name"] for r in json.loads(everything.out)["runs"]] == ["died"]  # dominates every finished trial


def test_leaderboard_parent_accepts_a_sweep_name(sweep_store, capsys):
    uri, _, ids = sweep_store
    result = run_dcad(capsys, "leaderboard", "--parent", "s1", "--metric", "val_pixel_auroc", "--json", "--tracking-uri", uri)
    assert result.code == 0, result.err
    names = [r["run_name"] for r in json.loads(result.out)["runs"]]
    assert names == ["accurate", "balanced", "dominated", "fast"]


def test_leaderboard_pareto_errors(sweep_store, capsys):
    uri, _, ids = sweep_store
    no_parent = run_dcad(capsys, "leaderboard", "--pareto", "--tracking-uri", uri)
    assert no_parent.code == 2 and "--pareto needs --parent" in no_parent.err
    unknown = run_dcad(capsys, "leaderboard", "--parent", "nosuchsweep", "--pareto", "--tracking-uri", uri)
    assert unknown.code == 2 and "no run with this id and no sweep with this name" in unknown.err
    not_sweep = run_dcad(capsys, "leaderboard", "--parent", ids["fast"], "--pareto", "--tracking-uri", uri)
    assert not_sweep.code == 2 and "records no sweep objectives" in not_sweep.err


def test_stopped_trials_end_killed_even_when_their_handler_said_failed(tmp_path):
    from dcad.platform.mlflow_store import mlflow_client
    from dcad.platform.sweep.reporting import TrialRecord, mark_stopped_children

    client = mlflow_client(sqlite_uri(tmp_path))
    experiment = client.create_experiment("stops")
    runs = {name: client.create_run(experiment).info.run_id for name in ("stopped", "crashed", "cut", "done")}
    client.set_terminated(runs["stopped"], "FAILED")  # an ASHA stop that reached the trial as an exception
    client.set_terminated(runs["crashed"], "FAILED")  # a real failure
    client.set_terminated(runs["done"], "FINISHED")
    records = [TrialRecord("a", "stopped", {}, runs["stopped"]), TrialRecord("b", "failed", {}, runs["crashed"]),
               TrialRecord("c", "incomplete", {}, runs["cut"]), TrialRecord("d", "finished", {}, runs["done"])]
    mark_stopped_children(client, records)
    status = {name: client.get_run(run_id).info.status for name, run_id in runs.items()}
    assert status == {"stopped": "KILLED", "crashed": "FAILED", "cut": "KILLED", "done": "FINISHED"}
