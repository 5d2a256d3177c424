"""`dcad sweep` on a real (loopback) Ray cluster: an end-to-end sweep, and an interrupted sweep resumed.

Both drive `dcad sweep` in a subprocess against one 2-CPU cluster (its own ports and temp dir), on a
2-category 64 px synthetic dataset with the tiny profile cut to a few iterations per epoch.
"""

from __future__ import annotations

import csv
import json
import signal
import time
from pathlib import Path

import pytest
import yaml

from fixtures_mlflow import run_dcad, sqlite_uri
from ray_helpers import RAY_TEST_ENV, run_dcad_process, start_cluster, start_dcad, wait_for

pytestmark = pytest.mark.slow

OVERRIDES = {
    "data.categories": ["brick", "hex_nut"],
    "train.base.iters_per_epoch": 8,
    "train.refiner.epochs": 1,
    "train.refiner.iters_per_epoch": 3,
    "train.validate_refiner": False,
    "train.val_max_images": 16,
}
OBJECTIVES = [("val_pixel_auroc", "max"), ("ms_per_image", "min")]


@pytest.fixture(scope="module")
def cluster():
    cluster = start_cluster([2])
    yield cluster
    cluster.stop()


def _synth(tmp_path_factory, n_train: int) -> Path:
    from dcad.core.data import synthesize

    root = tmp_path_factory.mktemp("sweep-data") / "data"
    synthesize(root, seed=0, size=64, categories=["brick", "hex_nut"], n_train=n_train, n_test=8)
    return root


@pytest.fixture(scope="module")
def sweep_data(tmp_path_factory) -> Path:
    """Small: for the mechanics (resume, capacity)."""
    return _synth(tmp_path_factory, 12)


@pytest.fixture(scope="module")
def main_job_data(tmp_path_factory) -> Path:
    """30 normal images a category: the validation split (20 %) gets 3 good and 3 defective ones, enough for the
    registration floor's AUROC to mean something."""
    return _synth(tmp_path_factory, 30)


def write_spec(path: Path, data: Path, storage: Path, uri: str, **changes) -> Path:
    spec = {
        "name": path.stem,
        "base": {"profile": "tiny", "overrides": {**OVERRIDES, "train.base.epochs": 2}},
        "dataset": str(data),
        "search_space": {
            "refiner.class_conditioning": {"type": "categorical", "choices": [True, False]},
            "refiner.guidance_scale": {"type": "float", "low": 0.5, "high": 3.0, "log": True,
                                       "when": {"refiner.class_conditioning": True}},
            "fusion.base_weight": {"type": "float", "low": 0.2, "high": 0.8},
        },
        "objective": [{"metric": m, "mode": mode} for m, mode in OBJECTIVES],
        "sampler": {"type": "tpe", "seed": 0},
        "num_trials": 3,
        "max_concurrent": 2,
        "resources": {"workers": 1, "cpus_per_worker": 0.5},
        "storage": str(storage),
        "tracking_uri": uri,
        "experiment": "sweeps",
        **changes,
    }
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def children(client, parent_id: str) -> list:
    exp = client.get_run(parent_id).info.experiment_id
    return client.search_runs([exp], filter_string=f"tags.mlflow.parentRunId = '{parent_id}'", max_results=100)


def front_of(runs: list) -> list:
    def worse(a, b):  # a dominated by b
        am, bm = a.data.metrics, b.data.metrics
        no_worse = bm["val_pixel_auroc"] >= am["val_pixel_auroc"] and bm["ms_per_image"] <= am["ms_per_image"]
        return no_worse and (bm["val_pixel_auroc"] > am["val_pixel_auroc"] or bm["ms_per_image"] < am["ms_per_image"])

    return [r for r in runs if not any(worse(r, o) for o in runs if o is not r)]


def test_sweep_end_to_end(cluster, main_job_data, tmp_path, capsys):
    import optuna

    from dcad.platform.mlflow_store import mlflow_client

    uri = sqlite_uri(tmp_path / "store")
    # trained enough (2 × 100 base iterations) for its best model to clear the registration and promotion floors
    base = {"profile": "tiny", "overrides": {**OVERRIDES, "train.base.epochs": 2, "train.base.iters_per_epoch": 100,
                                             "train.validate_refiner": True}}
    spec = write_spec(tmp_path / "e2e.yaml", main_job_data, tmp_path / "sweeps", uri, register_best="sweep-e2e", base=base,
                      early_stopping={"grace_period": 3, "max_t": 3, "reduction_factor": 2})  # after the refiner's epoch
    out = tmp_path / "result.json"
    proc = start_dcad(["sweep", str(spec), "--address", cluster.address, "--json", str(out)], tmp_path / "e2e.log")
    code = proc.wait(timeout=420)
    log = proc.text()
    assert code == 0, log[-5000:]
    result = json.loads(out.read_text())
    assert "done, " in log and "running" in log and "pending" in log and "best val_pixel_auroc=" in log  # progress lines

    client = mlflow_client(uri)
    parent = client.get_run(result["parent_run_id"])
    assert parent.data.tags["dcad.sweep"] == "e2e" and parent.data.tags["dcad.kind"] == "sweep"
    assert parent.info.status == "FINISHED"
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert "sweep.yaml" in artifacts
    assert "plots/pareto_front.png" in {a.path for a in client.list_artifacts(parent.info.run_id, "plots")}

    kids = children(client, parent.info.run_id)
    assert len(kids) == 3 == len(result["trials"])
    assert {k.data.tags["dcad.trial_id"] for k in kids} == {t["trial_id"] for t in result["trials"]}
    finished = [k for k in kids if k.info.status == "FINISHED"]
    assert finished, [k.info.status for k in kids]
    for run in finished:  # params, per-epoch curves, final metrics and the model
        assert run.data.params["train.base.epochs"] == "2"
        assert {"val_pixel_auroc", "ms_per_image", "test_image_auroc", "test_pixel_auroc"} <= set(run.data.metrics)
        steps = {m.step for m in client.get_metric_history(run.info.run_id, "base_train_loss")}
        assert steps == {1, 2}
        assert run.outputs.model_outputs
    for run in kids:
        assert run.info.status in ("FINISHED", "KILLED")  # ASHA-stopped trials are not left RUNNING

    # best trial: chosen on validation (and the measured cost), never on test
    front = front_of(finished)
    best = max(front, key=lambda r: r.data.metrics["val_pixel_auroc"])
    assert result["best_trial"]["run_id"] == best.info.run_id
    assert set(result["best_trial"]["objectives"]) == {"val_pixel_auroc", "ms_per_image"}
    assert parent.data.tags["dcad.best_run_id"] == best.info.run_id
    version = client.get_model_version_by_alias("sweep-e2e", "challenger")
    assert str(version.version) == result["registered_version"] and version.run_id == best.info.run_id

    # Optuna was told the validation metric of every finished trial
    study = optuna.load_study(study_name="e2e", storage=result["study_storage"])
    told = sorted(round(t.values[0], 6) for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE)
    assert sorted(round(r.data.metrics["val_pixel_auroc"], 6) for r in finished) == told

    board = run_dcad(capsys, "leaderboard", "--parent", "e2e", "--pareto", "--json", "--tracking-uri", uri)
    assert board.code == 0, board.err
    assert {r["run_id"] for r in json.loads(board.out)["runs"]} == {r.info.run_id for r in front}

    # The README's main job goes on: promote the registered model (by the run name the leaderboard shows),
    # evaluate the champion on the sweep's dataset (the model's own categories), predict with it.
    floor = 0.6
    promoted = run_dcad(capsys, "promote", "sweep-e2e", "--run", best.info.run_name, "--alias", "champion",
                        "--floor", str(floor), "--json", "--tracking-uri", uri)
    assert promoted.code == 0, promoted.err
    decision = json.loads(promoted.out)
    assert decision["decision"] == "first" and decision["moved"] and decision["below_floor"] == {}
    assert client.get_model_version_by_alias("sweep-e2e", "champion").version == version.version
    evaluated = run_dcad(capsys, "eval", "models:/sweep-e2e@champion", "--data", str(main_job_data), "--json",
                         str(tmp_path / "champion.json"), "--tracking-uri", uri)
    assert evaluated.code == 0, evaluated.err
    metrics = json.loads((tmp_path / "champion.json").read_text())
    assert set(metrics["categories"]) == {"brick", "hex_nut"}
    assert metrics["mean"]["image_auroc"] >= floor and metrics["mean"]["pixel_auroc"] >= floor, metrics["mean"]
    images = main_job_data / "brick" / "test"
    predicted = run_dcad(capsys, "predict", "models:/sweep-e2e@champion", str(images), "--out", str(tmp_path / "pred"),
                         "--tracking-uri", uri)
    assert predicted.code == 0, predicted.err
    rows = list(csv.DictReader((tmp_path / "pred" / "predictions.csv").open()))
    assert len(rows) == len(list(images.rglob("*.png"))) and all((tmp_path / "pred" / r["map"]).is_file() for r in rows)

    # ... and the one-liner can be run again: a new sweep of the same spec, not a refusal
    again = run_dcad(capsys, "sweep", str(spec), "--dry-run", "--address", cluster.address)
    assert again.code == 0 and "this is a new sweep 'e2e-2'" in " ".join(again.out.split()), again.err


def _results(trial_dir: Path) -> list[dict]:
    path = trial_dir / "result.json"
    lines = path.read_text().splitlines() if path.is_file() else []
    out = []
    for line in lines:
        try:
            out.append(json.loads(line))
        except ValueError:  # a line being written
            pass
    return out


def _interruptible(storage: Path, name: str):
    """One trial finished (its final result) and another with an epoch checkpoint but no final result, a checkpoint
    that Tune's saved experiment state already holds: a checkpoint directory is written by the trial before the
    driver registers it, and a Ctrl-C in between rightly restarts that trial from the start (a CI run hit it)."""
    dirs = sorted((storage / name / "tune").glob("trial_*"))
    done = [d for d in dirs if any(r.get("trial_done") == 1.0 for r in _results(d))]
    midway = [d for d in dirs if d not in done and list(d.glob("checkpoint_*"))]
    if not (done and midway and _tune_holds_a_checkpoint(storage / name / "tune", midway[0])):
        return None
    return done, midway


def _tune_holds_a_checkpoint(experiment: Path, trial_dir: Path) -> bool:
    """Whether the experiment state Tune last saved names a checkpoint of this trial."""
    from ray.tune import ExperimentAnalysis

    try:
        analysis = ExperimentAnalysis(str(experiment))
    except Exception:  # noqa: BLE001 - no state saved yet, or one being replaced
        return False
    trial_id = trial_dir.name.removeprefix("trial_")
    trial = next((t for t in analysis.trials if t.trial_id == trial_id), None)
    return trial is not None and analysis.get_last_checkpoint(trial) is not None


@pytest.mark.parametrize("how", ["sigint", "sigkill"])
def test_interrupted_sweep_resumes(cluster, sweep_data, tmp_path, how):
    """Ctrl-C, or the driver killed outright: `--resume` reruns no finished trial, continues the half-trained one
    from its checkpoint, and keeps the Optuna study and the MLflow parent run."""
    import optuna

    from dcad.platform.mlflow_store import mlflow_client

    uri = sqlite_uri(tmp_path / "store")
    storage = tmp_path / "sweeps"
    # refiner epochs long enough to catch a trial between its checkpoints, and for it not to finish in the
    # 3 s before a SIGKILL (at 25 iterations, with the windowed refinement's faster calibration, it sometimes did)
    overrides = {**OVERRIDES, "train.base.epochs": 2, "train.refiner.epochs": 3, "train.refiner.iters_per_epoch": 80}
    spec = write_spec(tmp_path / "resume.yaml", sweep_data, storage, uri, max_concurrent=1,
                      base={"profile": "tiny", "overrides": overrides})
    args = ["sweep", str(spec), "--address", cluster.address]
    first = start_dcad(args, tmp_path / "first.log", env={"TUNE_GLOBAL_CHECKPOINT_S": "1"})
    try:
        done, midway = wait_for(lambda: _interruptible(storage, "resume"), 480, "a finished and a half-trained trial")
    except AssertionError:
        first.kill()
        raise AssertionError(first.text()[-5000:]) from None
    if how == "sigint":
        first.proc.send_signal(signal.SIGINT)  # Ctrl-C: Tune stops the running trial and saves its state
        assert first.wait(timeout=120) == 130, first.text()[-4000:]
        assert "continue it with: dcad sweep SPEC --resume" in first.text()
    else:
        time.sleep(3)  # the experiment state (saved every second here) holds the midway trial's checkpoint
        first.kill()  # SIGKILL to the driver's process group: nothing is saved or ended

    state = json.loads((storage / "resume" / "sweep_state.json").read_text())
    client = mlflow_client(uri)
    before = {k.data.tags["dcad.trial_id"]: k for k in children(client, state["parent_run_id"])}
    finished_id = done[0].name.removeprefix("trial_")
    half_id = midway[0].name.removeprefix("trial_")
    assert before[finished_id].info.status == "FINISHED"
    study = optuna.load_study(study_name="resume", storage=state["study_storage"])
    assert optuna.get_all_study_names(storage=state["study_storage"]) == ["resume"]
    first_started = study.trials[0].datetime_start
    assert len(study.trials) == 2
    finished_value = [t.values for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(finished_value) == 1

    # a trial run that Tune never recorded before the kill (its experiment snapshot lags): nobody continues it
    lost = client.create_run(before[finished_id].info.experiment_id, run_name="trial-lost",
                             tags={"mlflow.parentRunId": state["parent_run_id"], "dcad.host": "gone-host", "dcad.trial_id": "lost"})

    out = tmp_path / "resumed.json"
    second = start_dcad([*args, "--resume", "--json", str(out)], tmp_path / "second.log")
    assert second.wait(timeout=600) == 0, second.text()[-5000:]
    log = second.text()
    result = json.loads(out.read_text())

    # the MLflow parent run is the same one, and it finished
    assert result["parent_run_id"] == state["parent_run_id"]
    assert client.get_run(state["parent_run_id"]).info.status == "FINISHED"
    trials = {t["trial_id"]: t for t in result["trials"]}
    assert len(trials) == 3 and all(t["status"] == "finished" for t in trials.values()), trials
    # the finished trial was not run again: same MLflow run, untouched, never restarted
    after = {k.data.tags["dcad.trial_id"]: k for k in children(client, state["parent_run_id"])}
    assert len(after) == 4 and len(children(client, state["parent_run_id"])) == 4  # 3 trials and the lost run
    assert after[finished_id].info.run_id == before[finished_id].info.run_id
    assert after[finished_id].info.end_time == before[finished_id].info.end_time
    assert f"trial {finished_id} started" not in log
    # the half-trained trial continued from its checkpoint, in its own MLflow run
    assert trials[half_id]["resumed_from_epoch"] >= 3, trials[half_id]  # 2 base epochs + at least one refiner epoch
    assert f"trial {half_id}: resuming from its checkpoint of epoch" in log
    assert after[half_id].info.run_id == before[half_id].info.run_id
    assert after[half_id].data.tags.get("dcad.resumed") == "true"
    # no trial run is left RUNNING: the one nobody continues ended FAILED, tagged as orphaned
    assert {k.info.status for k in children(client, state["parent_run_id"])} == {"FINISHED", "FAILED"}
    assert client.get_run(lost.info.run_id).info.status == "FAILED"
    assert "marked FAILED" in log and lost.info.run_id in log
    # the shared base branch was trained once, by the first driver
    assert "shared base branch: already trained" in log
    # the Optuna study continued: same study, one trial per Tune trial, all complete
    study = optuna.load_study(study_name="resume", storage=state["study_storage"])
    assert optuna.get_all_study_names(storage=state["study_storage"]) == ["resume"]
    assert study.trials[0].datetime_start == first_started
    assert len(study.trials) == 3
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)
    assert finished_value[0] in [t.values for t in study.trials]


def test_two_worker_trials_train_as_ray_train_runs(cluster, sweep_data, tmp_path):
    """`resources.workers: 2`: each trial drives a Ray Train run (DDP) from the shared base branch, its epoch
    reports reach Tune, and its MLflow child run holds what a one-worker trial's does."""
    from dcad.platform.mlflow_store import mlflow_client

    uri = sqlite_uri(tmp_path / "store")
    storage = tmp_path / "sweeps"
    spec = write_spec(tmp_path / "ddp.yaml", sweep_data, storage, uri, num_trials=2, max_concurrent=1,
                      resources={"workers": 2, "cpus_per_worker": 0.5},
                      search_space={"refiner.class_conditioning": {"type": "categorical", "choices": [True, False]}})
    out = tmp_path / "ddp.json"
    code, log = run_dcad_process(["sweep", str(spec), "--address", cluster.address, "--json", str(out)],
                                 tmp_path / "ddp.log", timeout=420)
    assert code == 0, log[-5000:]
    result = json.loads(out.read_text())
    assert [t["status"] for t in result["trials"]] == ["finished", "finished"], result["trials"]
    assert "wrapped in DistributedDataParallel across 2 workers" in log
    assert "shared base branch: training it once" in log
    client = mlflow_client(uri)
    for trial in result["trials"]:
        assert (storage / "ddp" / "trials" / f"trial-{trial['trial_id']}").is_dir()  # its Ray Train run
        run = client.get_run(trial["run_id"])
        assert run.info.status == "FINISHED" and run.outputs.model_outputs
        assert {"val_pixel_auroc", "ms_per_image", "test_pixel_auroc"} <= set(run.data.metrics)
        assert {m.step for m in client.get_metric_history(run.info.run_id, "base_train_loss")} == {1, 2}
        assert client.get_metric_history(run.info.run_id, "refiner_train_loss")
        forwarded = [r for r in _results(storage / "ddp" / "tune" / f"trial_{trial['trial_id']}") if r.get("trial_done") == 0.0]
        assert [r["stage"] for r in forwarded] == ["refiner", "final"], forwarded  # rank 0's reports, as they came
        assert forwarded[0]["epoch"] == 3  # 2 shared base epochs + 1


def test_trials_that_cannot_fit_fail_fast(cluster, sweep_data, tmp_path, capsys, monkeypatch):
    for name, value in RAY_TEST_ENV.items():
        monkeypatch.setenv(name, value)
    uri = sqlite_uri(tmp_path / "store")
    spec = write_spec(tmp_path / "big.yaml", sweep_data, tmp_path / "sweeps", uri,
                      resources={"workers": 2, "cpus_per_worker": 2})
    started = time.monotonic()
    try:
        result = run_dcad(capsys, "sweep", str(spec), "--address", cluster.address)
    finally:
        import ray

        ray.shutdown()
    assert result.code == 2, result.err
    assert "2 worker(s) × (2 CPU) = 4 CPU do not fit" in result.err and "it has 2 CPU" in result.err
    assert time.monotonic() - started < 60
    assert not (tmp_path / "sweeps" / "big" / "sweep_state.json").exists()  # nothing to resume: it never started


def test_sweep_goes_on_while_the_tracking_server_is_down(cluster, sweep_data, tmp_path):
    """A real `mlflow server` killed (SIGKILL) under a running trial, started again on the same store: the sweep
    finishes, and every trial's run ends FINISHED with its epochs logged once."""
    import os
    from contextlib import ExitStack

    from fixtures_servers import free_port, mlflow_server

    from dcad.platform.mlflow_store import mlflow_client

    port = free_port()
    with ExitStack() as stack:
        server = stack.enter_context(mlflow_server(tmp_path / "server", port=port))
        client = mlflow_client(server.url)
        overrides = {**OVERRIDES, "train.base.epochs": 2, "train.refiner.epochs": 3, "train.refiner.iters_per_epoch": 80}
        spec = write_spec(tmp_path / "outage.yaml", sweep_data, tmp_path / "sweeps", server.url, num_trials=3,
                          max_concurrent=1, base={"profile": "tiny", "overrides": overrides})
        out = tmp_path / "outage.json"
        sweep = start_dcad(["sweep", str(spec), "--address", cluster.address, "--json", str(out)], tmp_path / "outage.log",
                           env={"DCAD_TRACKING_WAIT_S": "300"})

        def trial_training():
            exp = client.get_experiment_by_name("sweeps")
            runs = client.search_runs([exp.experiment_id], "tags.`dcad.trial_id` != ''") if exp else []
            return any("refiner_train_loss" in r.data.metrics for r in runs)

        try:
            wait_for(trial_training, 300, "a trial's first refiner epoch in MLflow")
            os.killpg(server.proc.pid, signal.SIGKILL)
            server.proc.wait(timeout=30)
            wait_for(lambda: "unreachable" in sweep.text(), 120, "the outage to be noticed")
            time.sleep(5)  # the trial goes on training while the server is away
            assert sweep.proc.poll() is None, sweep.text()[-4000:]
            stack.enter_context(mlflow_server(tmp_path / "server", port=port))
            assert sweep.wait(timeout=600) == 0, sweep.text()[-5000:]
        finally:
            if sweep.proc.poll() is None:
                sweep.kill()
        log = " ".join(sweep.text().split())
        assert "kept write(s) replayed" in log
        result = json.loads(out.read_text())
        assert [t["status"] for t in result["trials"]] == ["finished"] * 3, result["trials"]
        assert client.get_run(result["parent_run_id"]).info.status == "FINISHED"
        for run in children(client, result["parent_run_id"]):
            assert run.info.status == "FINISHED", run.info
            assert {"val_pixel_auroc", "ms_per_image", "test_pixel_auroc"} <= set(run.data.metrics)
            steps = [m.step for m in client.get_metric_history(run.info.run_id, "base_train_loss")]
            assert steps == [1, 2], steps  # the shared base's epochs, once each
            refiner = [m.step for m in client.get_metric_history(run.info.run_id, "refiner_train_loss")]
            assert refiner == [1, 2, 3], refiner  # its refiner epochs (or those of the weights it re-scores), once each
            assert run.outputs.model_outputs
