"""The default store under ./.dcad, tracking URIs, unreachable servers, secrets, `dcad ui`, leaderboard."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
from fixtures_mlflow import run_dcad, sqlite_uri
from fixtures_servers import free_port

from dcad.platform.errors import TrackingError
from dcad.platform.secrets import redact
from dcad.platform.mlflow_store import check_store, default_tracking_uri, resolve_tracking_uri
from dcad.platform.tracking import TrackingOptions, start_run


@pytest.fixture()
def in_tmp(tmp_path, monkeypatch) -> Path:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("DCAD_HOME", raising=False)
    return tmp_path


def test_default_store_is_sqlite_under_dot_dcad_and_env_or_option_override_it(in_tmp, monkeypatch):
    assert resolve_tracking_uri() == f"sqlite:///{in_tmp / '.dcad' / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5999")
    assert resolve_tracking_uri() == "http://127.0.0.1:5999"
    assert resolve_tracking_uri("sqlite:////x/y.db") == "sqlite:////x/y.db"
    monkeypatch.setenv("DCAD_HOME", str(in_tmp / "elsewhere"))
    assert default_tracking_uri() == f"sqlite:///{in_tmp / 'elsewhere' / 'mlflow.db'}"


def test_runs_and_artifacts_of_the_default_store_stay_under_dot_dcad(in_tmp):
    tracker = start_run(TrackingOptions(experiment="local"), "eval")
    report = in_tmp / "report"
    report.mkdir()
    (report / "per_category.csv").write_text("category,image_auroc\na,0.5\n")
    tracker.log_artifacts(report, "report")
    tracker.finish()
    assert tracker.lost is None
    assert (in_tmp / ".dcad" / "mlflow.db").is_file()
    logged = list((in_tmp / ".dcad" / "artifacts").rglob("per_category.csv"))
    assert len(logged) == 1 and tracker.run_id in str(logged[0])
    assert not (in_tmp / "mlruns").exists() and not (in_tmp / "mlartifacts").exists()


def test_file_stores_are_refused_with_a_hint(in_tmp):
    with pytest.raises(TrackingError, match="no longer supports file stores"):
        check_store(f"file://{in_tmp}/mlruns")


def test_unreachable_server_fails_before_training_starts(in_tmp, capsys):
    port = free_port()  # nothing listens there
    secret_url = f"http://dcad:pa55w0rd-dcad-secret@127.0.0.1:{port}"
    result = run_dcad(capsys, "train", "--data", str(in_tmp / "no-data"), "--output", str(in_tmp / "out"),
                      "--profile", "tiny", "--tracking-uri", secret_url)
    assert result.code == 2
    assert "tracking server" in result.err and "is unreachable" in result.err and f"127.0.0.1:{port}" in result.err
    assert "pa55w0rd-dcad-secret" not in result.err + result.out
    assert len(result.err.strip().splitlines()) == 1  # one line, no traceback
    assert not (in_tmp / "out").exists()  # nothing written: no training started
    ok = run_dcad(capsys, "train", "--data", str(in_tmp / "no-data"), "--output", str(in_tmp / "out"),
                  "--profile", "tiny", "--no-track", "--tracking-uri", secret_url)
    assert "tracking server" not in ok.err and "no such dataset directory" in ok.err  # --no-track: no server contact


def test_train_with_a_bad_argument_opens_no_run(in_tmp, capsys, tiny_dataset):
    from dcad.platform.mlflow_store import mlflow_client

    uri = sqlite_uri(in_tmp / "store")
    busy = in_tmp / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("user data")
    mistakes = {
        "unknown profile": ["--profile", "nope"],
        "bad override": ["--set", "train.base.epochs=many"],
        "missing data": ["--data", str(in_tmp / "no-data")],
        "unknown category": ["--set", "data.categories=[nosuchthing]"],
        "non-empty output": ["--output", str(busy)],
        "bad device": ["--device", "tpu"],
    }
    for what, args in mistakes.items():
        base = {"--data": str(tiny_dataset), "--output": str(in_tmp / "out"), "--profile": "tiny"}
        base.update(dict(zip(args[::2], args[1::2])))
        result = run_dcad(capsys, "train", *[x for kv in base.items() for x in kv], "--tracking-uri", uri)
        assert result.code == 2, (what, result.err)
        assert len(result.err.strip().splitlines()) == 1, (what, result.err)
    client = mlflow_client(uri)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert runs == [], f"{len(runs)} run(s) left by mistakes: {[r.info.status for r in runs]}"
    assert (busy / "keep.txt").read_text() == "user data" and not (in_tmp / "out").exists()

def test_redact_masks_credentials_from_the_environment_and_urls(monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY")
    monkeypatch.setenv("AWS_SESSION_TOKEN", "FwoGZXIvYXdzEXAMPLETOKEN")
    monkeypatch.setenv("MY_SERVICE_PASSWORD", "hunter2hunter2")
    monkeypatch.setenv("SOME_FLAG_TOKEN", "true")  # too short to be a secret: ordinary words stay
    text = (
        "boto said wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY and FwoGZXIvYXdzEXAMPLETOKEN; "
        "db postgresql://mlflow:hunter2hunter2@db:5432/mlflow is true"
    )
    masked = redact(text)
    assert "EXAMPLEKEY" not in masked and "EXAMPLETOKEN" not in masked and "hunter2" not in masked
    assert "postgresql://***@db:5432/mlflow" in masked and masked.endswith("is true")


# ---- leaderboard ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def board_store(tmp_path_factory):
    """Five runs in experiment 'lb' (three children of a sweep run) with known metrics and params."""
    uri = sqlite_uri(tmp_path_factory.mktemp("leaderboard"))
    parent = start_run(TrackingOptions(uri, "lb", run_name="sweep"), "sweep")
    runs = {}
    for name, auroc, lr, child in [("a", 0.71, 1e-3, True), ("b", 0.93, 1e-4, True), ("c", 0.85, 1e-3, True), ("d", 0.99, 5e-4, False)]:
        t = start_run(TrackingOptions(uri, "lb", run_name=name, parent_run_id=parent.run_id if child else None), "train")
        t.log_params({"profile": "tiny", "train.base.lr": lr, "train.seed": 0})
        t.log_metrics({"test_image_auroc": auroc, "test_pixel_auroc": auroc - 0.1, "base_train_loss": 1 - auroc})
        t.finish()
        runs[name] = t.run_id
    no_metric = start_run(TrackingOptions(uri, "lb", run_name="crashed"), "train")
    no_metric.finish("FAILED")
    parent.finish()
    return uri, parent.run_id, runs


def test_leaderboard_ranks_runs_with_the_metric(board_store, capsys):
    uri, parent, runs = board_store
    out = run_dcad(capsys, "leaderboard", "--experiment", "lb", "--json", "--tracking-uri", uri)
    board = json.loads(out.out)
    assert [r["run_name"] for r in board["runs"]] == ["d", "b", "c", "a"]  # 'sweep' and 'crashed' lack the metric
    assert board["runs"][0]["metrics"]["test_pixel_auroc"] == pytest.approx(0.89)
    assert set(board["runs"][0]["params"]) == {"profile", "train.base.lr"}  # train.seed is the same everywhere
    children = json.loads(run_dcad(capsys, "leaderboard", "--parent", parent, "--top", "2", "--json", "--tracking-uri", uri).out)
    assert [r["run_name"] for r in children["runs"]] == ["b", "c"]
    by_loss = json.loads(run_dcad(capsys, "leaderboard", "-e", "lb", "-m", "base_train_loss", "--json", "--tracking-uri", uri).out)
    assert [r["run_name"] for r in by_loss["runs"]][:2] == ["d", "b"] and by_loss["order"] == "ascending"
    table = run_dcad(capsys, "leaderboard", "--experiment", "lb", "--tracking-uri", uri)
    assert table.code == 0 and table.out.index("0.990") < table.out.index("0.710")
    missing = run_dcad(capsys, "leaderboard", "--experiment", "nope", "--tracking-uri", uri)
    assert missing.code == 2 and "experiment 'nope' not found" in missing.err


# ---- dcad ui -------------------------------------------------------------------------------------
def _serving(address: str) -> bool:
    try:
        return requests.get(address + "/health", timeout=2).ok
    except requests.RequestException:
        return False


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_ui_serves_the_local_store_on_localhost_and_stops_with_its_children(in_tmp, sig):
    import fixtures_procs as procs

    tracker = start_run(TrackingOptions(experiment="seen-in-ui"), "eval")
    tracker.finish()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    proc = subprocess.Popen([sys.executable, "-m", "dcad.cli.app", "ui", "--port", "0"], cwd=in_tmp, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        match = re.search(r"http://127\.0\.0\.1:(\d+)", line)
        assert match, line
        address = match.group(0)
        deadline = time.monotonic() + 120
        while not _serving(address):
            assert proc.poll() is None and time.monotonic() < deadline, "the UI never served"
            time.sleep(0.5)
        found = requests.get(address + "/api/2.0/mlflow/experiments/get-by-name", params={"experiment_name": "seen-in-ui"}, timeout=10)
        assert found.ok and found.json()["experiment"]["name"] == "seen-in-ui"
        family = procs.descendants(proc.pid)
        assert family, "the server runs as a child of `dcad ui`"
        proc.send_signal(sig)  # to dcad alone, as `kill PID` or a supervisor would send it
        assert proc.wait(timeout=40) == 0
        stderr = proc.stderr.read()
        assert "Traceback" not in stderr and "CancelledError" not in stderr, stderr
        alive = [procs.read_cmdline(pid) for pid in family if procs.read_cmdline(pid)]
        assert not alive, f"left running after {sig.name}: {alive}"
        assert not _serving(address)
    finally:
        if proc.poll() is None:
            proc.kill()
