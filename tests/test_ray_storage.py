"""Checkpoint storage for Ray Train runs: local paths and S3 (a real moto_server on 127.0.0.1), no Ray needed."""

from __future__ import annotations

import json
import time

import pytest

from fixtures_servers import BUCKET, S3_CREDENTIALS, s3_client
from dcad.platform.ray_train import latest_checkpoint_meta
from dcad.platform.storage import StorageError, check_writable, resolve_storage

ENDPOINT_VARS = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "MLFLOW_S3_ENDPOINT_URL")


@pytest.fixture
def s3_env(monkeypatch):
    for name in ENDPOINT_VARS:
        monkeypatch.delenv(name, raising=False)
    for name, value in S3_CREDENTIALS.items():
        monkeypatch.setenv(name, value)
    return monkeypatch


def _leaks(text: str) -> list[str]:
    return [name for name, value in S3_CREDENTIALS.items() if name != "AWS_DEFAULT_REGION" and value in text]


def test_default_storage_is_an_absolute_local_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    location = resolve_storage(None, tmp_path / "out" / "checkpoints")
    assert not location.is_s3
    assert location.path == str((tmp_path / "out" / "checkpoints").resolve())
    relative = resolve_storage("runs/ckpt", tmp_path)
    assert relative.path == str(tmp_path / "runs" / "ckpt")
    check_writable(location)
    assert (tmp_path / "out" / "checkpoints").is_dir()
    assert list((tmp_path / "out" / "checkpoints").iterdir()) == []  # the probe file is removed


def test_unwritable_local_storage_names_the_path(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    location = resolve_storage(str(blocker / "ckpt"), tmp_path)
    with pytest.raises(StorageError, match=r"a-file/ckpt: not writable \(.+\)"):
        check_writable(location)


def test_s3_endpoint_comes_from_the_query_then_the_environment(s3_env):
    s3_env.setenv("MLFLOW_S3_ENDPOINT_URL", "http://127.0.0.1:3")
    assert resolve_storage("s3://b/p", None).endpoint == "http://127.0.0.1:3"
    s3_env.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:2")
    assert resolve_storage("s3://b/p", None).endpoint == "http://127.0.0.1:2"
    s3_env.setenv("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:1")
    location = resolve_storage("s3://b/some/prefix/", None)
    assert location.endpoint == "http://127.0.0.1:1"
    assert location.path == "b/some/prefix"  # Ray's storage_path: no scheme with a storage_filesystem
    query = resolve_storage("s3://b/p?endpoint_override=http://127.0.0.1:9", None)
    assert query.endpoint == "http://127.0.0.1:9"
    assert query.describe() == "s3://b/p at http://127.0.0.1:9"


def test_s3_uri_errors_are_one_line(s3_env):
    with pytest.raises(StorageError, match="unknown query parameter"):
        resolve_storage("s3://b/p?endpoint=http://x", None)
    with pytest.raises(StorageError, match="no bucket"):
        resolve_storage("s3:///prefix", None)
    with pytest.raises(StorageError, match="unsupported scheme 'gs://'"):
        resolve_storage("gs://b/p", None)


def test_s3_credentials_never_appear_in_what_users_see(s3_env):
    secret = S3_CREDENTIALS["AWS_SECRET_ACCESS_KEY"]
    location = resolve_storage(f"s3://{BUCKET}/p?endpoint_override=http://user:{secret}@127.0.0.1:1", None)
    assert secret not in location.describe() and "***" in location.describe()
    with pytest.raises(StorageError) as err:
        check_writable(location)
    assert _leaks(str(err.value)) == []


def test_s3_storage_is_checked_against_a_real_endpoint(s3_env, moto_endpoint):
    s3_env.setenv("AWS_ENDPOINT_URL_S3", moto_endpoint)
    location = resolve_storage(f"s3://{BUCKET}/probe-check", None)
    check_writable(location)
    listing = s3_client(moto_endpoint).list_objects_v2(Bucket=BUCKET, Prefix="probe-check/")
    assert [o["Key"] for o in listing.get("Contents", []) if "probe" in o["Key"].removeprefix("probe-check")] == []
    with pytest.raises(StorageError, match=r"s3://no-such-bucket/x at .+: not writable \(NO_SUCH_BUCKET"):
        check_writable(resolve_storage("s3://no-such-bucket/x", None))


def test_unreachable_s3_endpoint_fails_fast(s3_env):
    started = time.monotonic()
    with pytest.raises(StorageError, match="not writable .*(connect|NETWORK)"):
        check_writable(resolve_storage("s3://b/p?endpoint_override=http://127.0.0.1:1", None))
    assert time.monotonic() - started < 20


def _put_checkpoint(client, prefix: str, name: str, meta: dict | None) -> None:
    client.put_object(Bucket=BUCKET, Key=f"{prefix}/{name}/base.pt", Body=b"x")
    if meta is not None:
        client.put_object(Bucket=BUCKET, Key=f"{prefix}/{name}/dcad_checkpoint.json", Body=json.dumps(meta).encode())


def _put_snapshot(client, prefix: str, latest: str) -> None:
    """Ray's checkpoint-manager snapshot (the part dcad reads): which checkpoint is the latest complete one."""
    snapshot = {"ray_version": "2.60.0", "latest_checkpoint_result": {"checkpoint_dir_name": latest, "metrics": {}}}
    client.put_object(Bucket=BUCKET, Key=f"{prefix}/checkpoint_manager_snapshot.json", Body=json.dumps(snapshot).encode())


def test_restart_reports_the_checkpoint_ray_resumes_from(s3_env, moto_endpoint):
    """What a restarted driver reads to say where it resumes and to reuse the MLflow run id."""
    s3_env.setenv("AWS_ENDPOINT_URL_S3", moto_endpoint)
    client = s3_client(moto_endpoint)
    location = resolve_storage(f"s3://{BUCKET}/latest", None)
    assert latest_checkpoint_meta(location, "run-a") is None
    _put_checkpoint(client, "latest/run-a", "epoch_0001", {"epoch": 1, "mlflow_run_id": "r1"})
    assert latest_checkpoint_meta(location, "run-a") is None  # Ray never committed it: it starts afresh
    _put_checkpoint(client, "latest/run-a", "epoch_0002", {"epoch": 2, "mlflow_run_id": "r1"})
    _put_snapshot(client, "latest/run-a", "epoch_0002")
    _put_checkpoint(client, "latest/run-a", "epoch_0003", {"epoch": 3, "mlflow_run_id": "r1"})  # uploaded, not committed
    meta = latest_checkpoint_meta(location, "run-a")
    assert (meta["epoch"], meta["checkpoint_dir"], meta["mlflow_run_id"]) == (2, "epoch_0002", "r1")
    _put_checkpoint(client, "latest/run-a", "final", {"epoch": 4, "final": True})
    _put_snapshot(client, "latest/run-a", "final")
    assert latest_checkpoint_meta(location, "run-a")["checkpoint_dir"] == "final"
    _put_snapshot(client, "latest/run-a", "epoch_0009")  # a snapshot naming a checkpoint without metadata
    assert latest_checkpoint_meta(location, "run-a") is None
    assert latest_checkpoint_meta(location, "run-b") is None
