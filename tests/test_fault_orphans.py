"""Runs whose process died (SIGKILL, OOM) are ended by the next resume, never left RUNNING or ranked."""

from __future__ import annotations

import json
import subprocess
import sys

from fixtures_mlflow import run_dcad, sqlite_uri, synth_dataset, train_args
from ray_helpers import run_dcad_process, start_dcad, wait_for

from dcad.platform.mlflow_store import mlflow_client
from dcad.platform.tracking import ORPHANED_TAG, TrackingOptions, end_orphaned_runs, start_run


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_only_runs_whose_writer_is_gone_are_ended(tmp_path):
    uri = sqlite_uri(tmp_path / "store")
    runs = {}
    for name in ("dead", "alive", "elsewhere", "other_dir"):
        tags = {"dcad.model_dir": "/models/x" if name != "other_dir" else "/models/y"}
        runs[name] = start_run(TrackingOptions(uri, "orphans", run_name=name, tags=tags), "train")
    client = mlflow_client(uri)
    client.set_tag(runs["dead"].run_id, "dcad.pid", str(_dead_pid()))
    client.set_tag(runs["elsewhere"].run_id, "dcad.host", "another-host")  # its pid cannot be checked from here
    client.set_tag(runs["other_dir"].run_id, "dcad.pid", str(_dead_pid()))

    ended = end_orphaned_runs(client, runs["dead"].experiment_id, "tags.`dcad.model_dir` = '/models/x'", "test")
    assert sorted(ended) == sorted([runs["dead"].run_id, runs["elsewhere"].run_id])
    status = {name: client.get_run(t.run_id).info.status for name, t in runs.items()}
    assert status == {"dead": "FAILED", "alive": "RUNNING", "elsewhere": "FAILED", "other_dir": "RUNNING"}
    assert client.get_run(runs["dead"].run_id).data.tags[ORPHANED_TAG] == "test"

    # a resume that continues the run reopens it: RUNNING again, written by this process, no longer orphaned
    again = start_run(TrackingOptions(uri, "orphans"), "train", run_id=runs["dead"].run_id)
    run = client.get_run(again.run_id)
    assert run.info.status == "RUNNING" and ORPHANED_TAG not in run.data.tags
    assert not end_orphaned_runs(client, again.experiment_id, "tags.`dcad.model_dir` = '/models/x'", "test")


def test_train_resume_ends_the_run_of_a_killed_train(tmp_path, capsys):
    data = synth_dataset(tmp_path / "data")
    uri = sqlite_uri(tmp_path / "store")
    output = tmp_path / "model"
    tracking = ["--tracking-uri", uri, "--experiment", "orphans"]
    client = mlflow_client(uri)

    def running_run():
        exp = client.get_experiment_by_name("orphans") if (tmp_path / "store").exists() else None
        found = client.search_runs([exp.experiment_id], "tags.`dcad.model_dir` != ''") if exp else []
        return found[0] if found else None

    first = start_dcad(train_args(data, output, *tracking, "--run-name", "killed"), tmp_path / "first.log")
    try:
        killed = wait_for(running_run, 180, "the first train's MLflow run")
    finally:
        first.kill()  # SIGKILL: the run is never ended by its process
    assert client.get_run(killed.info.run_id).info.status == "RUNNING"

    code, log = run_dcad_process(train_args(data, output, *tracking, "--run-name", "resumed", "--resume"),
                                 tmp_path / "second.log", timeout=300)
    assert code == 0, log[-3000:]
    assert f"MLflow run {killed.info.run_id} of {output} was left RUNNING by a process that died: marked FAILED" in " ".join(log.split())
    old = client.get_run(killed.info.run_id)
    assert old.info.status == "FAILED" and "dcad train --resume" in old.data.tags[ORPHANED_TAG]
    exp_id = old.info.experiment_id
    (new,) = client.search_runs([exp_id], "attributes.run_name = 'resumed'")
    assert new.info.status == "FINISHED"

    # the leaderboard ranks the finished run only; --unfinished shows the other one too
    board = json.loads(run_dcad(capsys, "leaderboard", "-e", "orphans", "-m", "val_pixel_auroc", "--json", "--tracking-uri", uri).out)
    assert [r["run_id"] for r in board["runs"]] == [new.info.run_id]
