"""An S3 endpoint that refuses connections for a while (a loopback proxy in front of moto goes down, also in
the middle of an upload, then comes back): uploads are retried by the SDKs' standard retry modes, and what
is stored is whole or absent, never a partial object that a resume would load."""

from __future__ import annotations

import threading
import time

import pytest
import torch
from fixtures_servers import BUCKET, S3_CREDENTIALS, OutageProxy, s3_client

from dcad.core.config import load_config
from dcad.platform.stage_store import StageStore
from dcad.platform.storage import list_keys, resolve_storage
from dcad.train.shared_stages import TrainedWeights

pytestmark = pytest.mark.slow
OUTAGE_S = 5.0


@pytest.fixture()
def s3_proxy(moto_endpoint, monkeypatch):
    for name, value in S3_CREDENTIALS.items():
        monkeypatch.setenv(name, value)
    proxy = OutageProxy(moto_endpoint).up()
    yield proxy
    proxy.down()


def _weights() -> TrainedWeights:
    torch.manual_seed(0)
    return TrainedWeights({"w": torch.randn(1024, 2048)}, torch.randn(3, 16), None, [{"stage": "base", "epoch": 1}])


def _store(proxy: OutageProxy, prefix: str) -> StageStore:
    return StageStore(resolve_storage(f"s3://{BUCKET}/{prefix}?endpoint_override={proxy.url}", None), "d" * 64)


def _back_after(proxy: OutageProxy, seconds: float) -> threading.Thread:
    def wait_then_up():
        while proxy.cut_after is not None:  # not cut yet
            time.sleep(0.05)
        time.sleep(seconds)
        proxy.up()

    thread = threading.Thread(target=wait_then_up, daemon=True)
    thread.start()
    return thread


def test_a_stage_upload_cut_midway_is_retried_and_stored_whole(s3_proxy, moto_endpoint):
    cfg, weights = load_config(profile="tiny"), _weights()
    store = _store(s3_proxy, "outage-retried")
    s3_proxy.cut_after = s3_proxy.sent + 3_000_000  # of an 8 MB stage
    back = _back_after(s3_proxy, OUTAGE_S)
    started = time.monotonic()
    store.publish("weights", cfg, weights)
    took = time.monotonic() - started
    back.join(timeout=30)
    assert took >= OUTAGE_S, took  # it waited for the endpoint instead of failing
    fetched = store.fetch("weights", cfg)
    assert fetched is not None and torch.equal(fetched.base["w"], weights.base["w"])


def test_a_stage_upload_that_runs_out_of_retries_leaves_no_object(s3_proxy, moto_endpoint, monkeypatch):
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")
    cfg, weights = load_config(profile="tiny"), _weights()
    store = _store(s3_proxy, "outage-failed")
    s3_proxy.cut_after = s3_proxy.sent + 3_000_000
    with pytest.raises(OSError):
        store.publish("weights", cfg, weights)  # the endpoint stays down
    s3_proxy.up()
    assert not store.has("weights", cfg)
    assert list_keys(s3_client(moto_endpoint), BUCKET, "outage-failed/") == []  # not even a partial object
    store.publish("weights", cfg, weights)  # and a later try stores it whole
    assert torch.equal(store.fetch("weights", cfg).base["w"], weights.base["w"])


def test_model_logging_to_s3_cut_midway_ends_with_one_whole_model(s3_proxy, moto_endpoint, trained, tmp_path, monkeypatch):
    """Direct S3 artifacts (the client uploads them itself): the model upload loses its connection midway, the
    endpoint is back after a few seconds, and the run ends with one READY model holding every file."""
    from mlflow.entities import LoggedModelStatus

    from dcad.platform.mlflow_store import mlflow_client
    from dcad.platform.tracking import TrackingOptions, start_run
    from fixtures_mlflow import sqlite_uri

    monkeypatch.setenv("MLFLOW_S3_ENDPOINT_URL", s3_proxy.url)
    for name in ("AWS_REQUEST_CHECKSUM_CALCULATION", "AWS_RESPONSE_CHECKSUM_VALIDATION"):
        monkeypatch.setenv(name, "when_required")
    uri = sqlite_uri(tmp_path / "store")
    client = mlflow_client(uri)
    client.create_experiment("s3-outage", artifact_location=f"s3://{BUCKET}/s3-outage")
    tracker = start_run(TrackingOptions(uri, "s3-outage", run_name="cut"), "train")
    s3_proxy.cut_after = s3_proxy.sent + 200_000  # inside the model's files
    back = _back_after(s3_proxy, OUTAGE_S)
    started = time.monotonic()
    tracker.log_model(trained.model_dir)
    tracker.finish(wait_s=120)
    back.join(timeout=30)
    assert s3_proxy.cut_after is None and time.monotonic() - started >= OUTAGE_S  # the cut happened, and was waited out
    assert tracker.lost is None, tracker.lost
    models = client.search_logged_models([tracker.experiment_id], filter_string=f"source_run_id = '{tracker.run_id}'")
    assert [m.status for m in models] == [LoggedModelStatus.READY]
    keys = list_keys(s3_client(moto_endpoint), BUCKET, "s3-outage/")
    stored = {k.rsplit("/", 1)[-1] for k in keys if "/artifacts/" in k or k.endswith("MLmodel")}
    expected = {p.name for p in trained.model_dir.rglob("*")
                if p.is_file() and "checkpoints" not in p.parts and p.suffix in (".safetensors", ".json", ".yaml")}
    assert expected <= stored, sorted(expected - stored)
    assert client.get_run(tracker.run_id).info.status == "FINISHED"
