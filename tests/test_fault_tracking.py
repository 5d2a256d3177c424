"""A real `mlflow server` killed (SIGKILL) mid-training and started again on the same store: training goes
on, and every metric, param, artifact and the model reach the run once it is back, none twice."""

from __future__ import annotations

import os
import signal
import time
from contextlib import ExitStack

import pytest
from fixtures_mlflow import synth_dataset, train_args
from fixtures_servers import free_port, mlflow_server
from ray_helpers import start_dcad, wait_for

from dcad.platform.mlflow_store import mlflow_client

BASE_EPOCHS = 6


def _first_epoch_logged(client):
    exp = client.get_experiment_by_name("faults")
    runs = client.search_runs([exp.experiment_id]) if exp else []
    return runs[0] if runs and "base_train_loss" in runs[0].data.metrics else None


@pytest.mark.slow
def test_training_goes_on_while_the_tracking_server_is_down_and_every_write_arrives(tmp_path):
    from mlflow.entities import LoggedModelStatus

    data = synth_dataset(tmp_path / "data")
    output, port = tmp_path / "model", free_port()
    longer = ["--set", f"train.base.epochs={BASE_EPOCHS}", "--set", "train.base.iters_per_epoch=15"]
    with ExitStack() as stack:
        server = stack.enter_context(mlflow_server(tmp_path / "server", port=port))
        client = mlflow_client(server.url)
        args = train_args(data, output, "--tracking-uri", server.url, "--experiment", "faults", *longer)
        train = start_dcad(args, tmp_path / "train.log", env={"DCAD_TRACKING_WAIT_S": "240"})
        try:
            run = wait_for(lambda: _first_epoch_logged(client), 240, "the first logged epoch")
            os.killpg(server.proc.pid, signal.SIGKILL)  # the server and its workers, no goodbye
            server.proc.wait(timeout=30)
            wait_for(lambda: "unreachable" in train.text(), 120, "the store to be noticed gone")
            # training goes on while the server is down: later epochs are printed, nothing has failed
            wait_for(lambda: f"base epoch {BASE_EPOCHS}/{BASE_EPOCHS}" in train.text() or train.proc.poll() is not None,
                     240, "the last base epoch")
            assert train.proc.poll() in (None, 0), train.text()[-3000:]
            stack.enter_context(mlflow_server(tmp_path / "server", port=port))  # back, same database and artifacts
            assert train.wait(timeout=400) == 0, train.text()[-4000:]
        finally:
            if train.proc.poll() is None:
                train.kill()
        log = " ".join(train.text().split())
        assert "kept write(s) replayed" in log, log[-3000:]

        run = client.get_run(run.info.run_id)
        assert run.info.status == "FINISHED"
        # every epoch's metrics once: the ones logged before, during and after the outage
        assert [m.step for m in client.get_metric_history(run.info.run_id, "base_train_loss")] == list(range(1, BASE_EPOCHS + 1))
        assert [m.step for m in client.get_metric_history(run.info.run_id, "refiner_train_loss")] == [1]
        assert {"test_image_auroc", "test_pixel_auroc", "test_aupro", "val_pixel_auroc"} <= set(run.data.metrics)
        assert run.data.params["train.base.epochs"] == str(BASE_EPOCHS)
        artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert {"config.yaml", "report"} <= artifacts, artifacts
        assert {a.path for a in client.list_artifacts(run.info.run_id, "report")} >= {"report/roc.png"}
        models = client.search_logged_models([run.info.experiment_id], filter_string=f"source_run_id = '{run.info.run_id}'")
        assert [m.status for m in models] == [LoggedModelStatus.READY]  # one model, whole
        assert run.data.tags["dcad.model_uri"] == f"models:/{models[0].model_id}"


def test_a_write_buffer_that_gives_up_keeps_no_copies_and_reports_no_refusal(tmp_path, monkeypatch):
    """Files queued for upload are copied aside (the caller's directory may go); when `drain` gives up on the
    store, nothing more is sent, so the copies go too, and the write cut short is not taken for a refusal."""
    import tempfile

    from dcad.platform import tracking_buffer
    from dcad.platform.tracking_buffer import WriteBuffer

    spools = tmp_path / "tmp"
    spools.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(spools))
    monkeypatch.setattr(tracking_buffer, "BACKOFF_S", (0.05,))
    model = tmp_path / "model"
    model.mkdir()
    (model / "weights.bin").write_bytes(b"x" * 1024)
    sent = []

    def upload(path):  # like a real upload: the store refuses the connection, or the file is not there
        sent.append(path.is_dir())
        if not path.is_dir():
            raise FileNotFoundError(path)
        raise ConnectionError("Connection refused")

    buffer = WriteBuffer("http://127.0.0.1:1")
    buffer.submit("upload artifacts", upload, source=model)
    assert buffer.pending == 1 and len(list(spools.glob("dcad-tracking-spool-*"))) == 1
    assert buffer.drain(0.3) is False
    assert list(spools.glob("dcad-tracking-spool-*")) == []
    wait_for(lambda: len(sent) >= 2 and not sent[-1], 10, "the replay thread's retry of the discarded copy")
    time.sleep(0.2)
    assert buffer.broken is None
    assert buffer.submit("log metrics", lambda: sent.append("late")) is None and "late" not in sent
