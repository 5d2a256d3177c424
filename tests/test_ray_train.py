"""`dcad train --workers N` on a real 2-node Ray cluster on loopback (started and stopped here).

One session-scoped cluster (head + a second node, 1 CPU each) is shared by the tests; every training
runs `dcad train` as a subprocess against it. S3 is a real moto_server on 127.0.0.1.
"""

from __future__ import annotations

import json
import os
import re
import signal
from pathlib import Path

import pytest

from fixtures_servers import BUCKET, CHECKSUMS, S3_CREDENTIALS, OutageProxy, s3_client
from fixtures_mlflow import run_dcad
from ray_helpers import RAY_TEST_ENV, ray_dataset, run_dcad_process, start_cluster, start_dcad, wait_for  # noqa: F401

pytestmark = pytest.mark.slow

# validation is scored on 8 images and only after base epochs (the final calibration is unchanged)
LIGHT_VALIDATION = ["--set", "train.val_max_images=8", "--set", "train.validate_refiner=false"]
# the tiny profile as shipped (base 3 × 40 iterations, refiner 2 × 20): trained enough that its test metrics
# are stable (in-process, seeds 0/1/2 gave image AUROC 0.852/0.857/0.863, pixel AUROC 0.942 ± 0.001)
PROFILE = ["train", "--profile", "tiny", *LIGHT_VALIDATION]
PROFILE_EPOCHS = {"base": 3, "refiner": 2}
# shorter, for the tests about process failures (metrics are not compared there)
EPOCHS = {"base": 2, "refiner": 2}
TOTAL_EPOCHS = EPOCHS["base"] + EPOCHS["refiner"]
TINY = [
    *PROFILE,
    "--set", f"train.base.epochs={EPOCHS['base']}", "--set", f"train.refiner.epochs={EPOCHS['refiner']}",
    "--set", "train.base.iters_per_epoch=20", "--set", "train.refiner.iters_per_epoch=6",
]
RUN_TIMEOUT_S = 420
METRICS_COMPARED = ("image_auroc", "pixel_auroc", "aupro")


@pytest.fixture(scope="module")
def cluster():
    cluster = start_cluster([1, 1])
    yield cluster
    cluster.stop()


def _history(model_dir: Path) -> list[dict]:
    return json.loads((model_dir / "history.json").read_text())["epochs"]


def _global_epochs(model_dir: Path) -> list[int]:
    return [entry["global_epoch"] for entry in _history(model_dir)]


def _losses(model_dir: Path, stage: str) -> list[float]:
    return [e["train_loss"] for e in _history(model_dir) if e["stage"] == stage]


def _mean_metrics(model_dir: Path) -> dict[str, float]:
    return json.loads((model_dir / "metrics.json").read_text())["mean"]


def _committed_epoch(storage: Path, name: str) -> int:
    """The global epoch of the latest checkpoint Ray has committed (its snapshot), 0 if none yet."""
    try:
        snapshot = json.loads((storage / name / "checkpoint_manager_snapshot.json").read_text())
        directory = snapshot["latest_checkpoint_result"]["checkpoint_dir_name"]
    except (OSError, ValueError, KeyError, TypeError):
        return 0
    match = re.fullmatch(r"epoch_(\d+)", directory or "")
    return int(match.group(1)) if match else TOTAL_EPOCHS


def _resumed_epoch(log: str, pattern: str) -> int:
    match = re.search(pattern, log)
    assert match, f"no line matching {pattern!r} in the log:\n{log[-3000:]}"
    return int(match.group(1))


def test_cluster_too_small_says_what_it_has(cluster, ray_dataset, tmp_path, capsys, monkeypatch):  # noqa: F811
    """Checked against the live cluster before any worker starts (Ray itself would wait for resources)."""
    import ray

    for name, value in RAY_TEST_ENV.items():
        monkeypatch.setenv(name, value)
    base = [*TINY, "--data", str(ray_dataset), "--no-track", "--address", cluster.address]
    try:
        result = run_dcad(capsys, *base, "--output", str(tmp_path / "a"), "--workers", "3")
        assert result.code == 2, result.err[-2000:]
        assert re.search(
            r"error: 3 worker\(s\) × \(1 CPU\) = 3 CPU do not fit Ray cluster at .+: it has 2 CPU and 0 GPU on 2 node\(s\)",
            result.err,
        )
        result = run_dcad(capsys, *base, "--output", str(tmp_path / "b"), "--workers", "1", "--gpus-per-worker", "1")
        assert result.code == 2, result.err[-2000:]
        assert "1 GPU do not fit" in result.err and "0 GPU on 2 node(s)" in result.err
        assert "Traceback" not in result.err
    finally:
        ray.shutdown()


def test_two_workers_match_one_worker_with_checkpoints_on_s3(cluster, ray_dataset, tmp_path, moto_endpoint):  # noqa: F811
    """Same seed; 2 workers with half the per-worker batch reach the 1-worker test metrics within ±0.02."""
    common = [*PROFILE, "--data", str(ray_dataset), "--address", cluster.address]
    total = sum(PROFILE_EPOCHS.values())
    one, two = tmp_path / "one", tmp_path / "two"
    tracking = f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    (tmp_path / "mlruns").mkdir()
    s3_env = {**S3_CREDENTIALS, **CHECKSUMS, "AWS_ENDPOINT_URL_S3": moto_endpoint}
    # both at once (1 CPU + 2 × 0.5 CPU: the cluster holds both), so their start-up waits overlap
    run_one = start_dcad(
        [*common, "--output", str(one), "--no-track", "--workers", "1", "--name", "eq-one"], tmp_path / "one.log"
    )
    run_two = start_dcad(
        [*common, "--output", str(two), "--tracking-uri", tracking, "--workers", "2", "--cpus-per-worker", "0.5",
         "--name", "eq-two", "--storage", f"s3://{BUCKET}/ray-eq",
         "--set", "train.base.batch_size=8", "--set", "train.refiner.batch_size=4"],
        tmp_path / "two.log", env=s3_env,
    )
    try:
        code_one, code_two = run_one.wait(RUN_TIMEOUT_S), run_two.wait(RUN_TIMEOUT_S)
    finally:
        for run in (run_one, run_two):
            if run.proc.poll() is None:
                run.kill()
    log_one, log_two = run_one.text(), run_two.text()
    assert code_one == 0, log_one[-4000:]
    assert code_two == 0, log_two[-4000:]

    # same results
    a, b = _mean_metrics(one), _mean_metrics(two)
    for key in METRICS_COMPARED:
        assert abs(a[key] - b[key]) <= 0.02, (key, a[key], b[key])
    for model_dir in (one, two):  # both trained both stages, epoch by epoch, and the losses went down
        assert _global_epochs(model_dir) == list(range(1, total + 1))
        for stage in ("base", "refiner"):
            assert _losses(model_dir, stage)[-1] < 0.97 * _losses(model_dir, stage)[0], (model_dir.name, stage)
    for stage in ("base", "refiner"):  # same trajectory: the last epoch's loss agrees within 5 %
        assert abs(_losses(two, stage)[-1] - _losses(one, stage)[-1]) <= 0.05 * _losses(one, stage)[-1], stage

    # checkpoints on S3: rank 0 wrote them; CheckpointConfig kept the last two
    keys = {o for o in _s3_keys(moto_endpoint, "ray-eq/eq-two/")}
    assert "ray-eq/eq-two/final/model/base/model.safetensors" in keys
    kept = {k.split("/")[2] for k in keys if re.match(r"ray-eq/eq-two/(epoch_\d{4}|final)/dcad_checkpoint.json", k)}
    assert kept == {f"epoch_{total:04d}", "final"}
    assert "wrapped in DistributedDataParallel across 2 workers" in log_two
    assert f"checkpoints in s3://{BUCKET}/ray-eq/eq-two at {moto_endpoint}" in log_two

    # one MLflow run, metrics from rank 0 only (one value per epoch), no credentials anywhere
    run = _only_run(tracking)
    assert run.info.status == "FINISHED"
    assert _steps(tracking, run.info.run_id, "base_train_loss", unique=False) == [1, 2, 3]
    assert _steps(tracking, run.info.run_id, "refiner_train_loss", unique=False) == [1, 2]
    assert "test_image_auroc" in run.data.metrics
    exposed = json.dumps(run.data.params) + json.dumps(run.data.tags) + log_two
    assert not [n for n, v in S3_CREDENTIALS.items() if n != "AWS_DEFAULT_REGION" and v in exposed]


def test_worker_then_driver_killed_resume_from_last_checkpoint(cluster, ray_dataset, tmp_path):  # noqa: F811
    """A worker process dies (Ray replaces it), later the driver dies: the same command resumes, same MLflow run."""
    storage, output = tmp_path / "ckpt", tmp_path / "model"
    tracking = f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    (tmp_path / "mlruns").mkdir()
    args = [*TINY, "--data", str(ray_dataset), "--output", str(output), "--tracking-uri", tracking,
            "--address", cluster.address, "--workers", "2", "--cpus-per-worker", "1", "--max-failures", "1",
            "--storage", str(storage), "--name", "faults"]
    first = start_dcad(args, tmp_path / "first.log")
    try:
        wait_for(lambda: _committed_epoch(storage, "faults") >= 1 or first.proc.poll() is not None, 300, "checkpoint 1")
        victims = cluster.train_worker_pids(node_index=1)  # 1 CPU per worker and per node: one worker there
        assert len(victims) == 1, (victims, first.text()[-3000:])
        os.kill(victims[0], signal.SIGKILL)
        wait_for(lambda: _committed_epoch(storage, "faults") >= 2 or first.proc.poll() is not None, 300, "checkpoint 2")
        assert first.proc.poll() is None, first.text()[-4000:]
    finally:
        first.kill()  # SIGKILL to the driver's process group; Ray ends the job's workers
    worker_resumed = _resumed_epoch(first.text(), r"dcad: resuming from the checkpoint of epoch (\d+)/" + str(TOTAL_EPOCHS))
    assert worker_resumed >= 1
    run_id = _only_run(tracking).info.run_id

    code, log = run_dcad_process(args, tmp_path / "second.log", RUN_TIMEOUT_S)
    assert code == 0, log[-4000:]
    driver_resumed = _resumed_epoch(log, r"resuming run 'faults' from its checkpoint of epoch (\d+)/" + str(TOTAL_EPOCHS))
    assert driver_resumed >= 2
    assert f"dcad: resuming from the checkpoint of epoch {driver_resumed}/{TOTAL_EPOCHS}" in log
    assert f"continuing MLflow run {run_id}" in log
    assert _global_epochs(output) == list(range(1, TOTAL_EPOCHS + 1))
    run = _only_run(tracking)
    assert run.info.run_id == run_id and run.info.status == "FINISHED"
    assert _steps(tracking, run_id, "base_train_loss") == [1, 2]
    assert _steps(tracking, run_id, "refiner_train_loss") == [1, 2]


def test_s3_cut_during_a_checkpoint_upload_is_waited_out_and_the_checkpoint_resumes_whole(
        cluster, ray_dataset, tmp_path, moto_endpoint):  # noqa: F811
    """The S3 endpoint (a proxy in front of moto) goes down in the middle of checkpoint 2's upload and is back
    5 s later: the upload is retried and training goes on. The driver is then killed, and the same command
    resumes from that checkpoint (whole: every file its metadata lists, at its size)."""
    import threading
    import time

    proxy = OutageProxy(moto_endpoint).up()
    args = [*TINY, "--data", str(ray_dataset), "--output", str(tmp_path / "model"), "--no-track",
            "--address", cluster.address, "--workers", "1", "--name", "cut",
            "--storage", f"s3://{BUCKET}/ray-cut?endpoint_override={proxy.url}"]
    env = {**S3_CREDENTIALS, **CHECKSUMS}
    first = start_dcad(args, tmp_path / "first.log", env=env)
    try:
        wait_for(lambda: _committed_s3_epoch(moto_endpoint, "ray-cut/cut") >= 1 or first.proc.poll() is not None,
                 300, "checkpoint 1")
        proxy.cut_after = proxy.sent + 500_000  # inside checkpoint 2's base.pt (1.4 MB)
        wait_for(lambda: proxy.cut_after is None or first.proc.poll() is not None, 300, "the cut")
        cut_at = time.monotonic()
        threading.Timer(5.0, proxy.up).start()
        wait_for(lambda: _committed_s3_epoch(moto_endpoint, "ray-cut/cut") >= 2 or first.proc.poll() is not None,
                 300, "checkpoint 2")
        assert first.proc.poll() is None, first.text()[-4000:]
        assert time.monotonic() - cut_at >= 5.0  # checkpoint 2 waited for the endpoint
    finally:
        first.kill()
    try:
        code, log = run_dcad_process(args, tmp_path / "second.log", RUN_TIMEOUT_S, env=env)
    finally:
        proxy.down()
    assert code == 0, log[-4000:]
    assert "incomplete" not in first.text() + log
    assert _resumed_epoch(log, r"dcad: resuming from the checkpoint of epoch (\d+)/" + str(TOTAL_EPOCHS)) >= 2
    assert _global_epochs(tmp_path / "model") == list(range(1, TOTAL_EPOCHS + 1))
    client = s3_client(moto_endpoint)
    sizes = {o["Key"]: o["Size"] for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix="ray-cut/")
             for o in page.get("Contents", [])}
    for key in [k for k in sizes if k.endswith("/dcad_checkpoint.json")]:
        listed = json.loads(client.get_object(Bucket=BUCKET, Key=key)["Body"].read())["files"]
        directory = key.rsplit("/", 1)[0]
        assert listed and {f"{directory}/{n}": n_bytes for n, n_bytes in listed.items()}.items() <= sizes.items(), key


# ---- helpers -----------------------------------------------------------------------------------------
def _s3_keys(endpoint: str, prefix: str) -> list[str]:
    from dcad.platform.storage import list_keys

    return list_keys(s3_client(endpoint), BUCKET, prefix)


def _committed_s3_epoch(endpoint: str, run_prefix: str) -> int:
    """`_committed_epoch` for a run stored on S3."""
    try:
        body = s3_client(endpoint).get_object(Bucket=BUCKET, Key=f"{run_prefix}/checkpoint_manager_snapshot.json")["Body"]
        directory = json.loads(body.read())["latest_checkpoint_result"]["checkpoint_dir_name"]
    except Exception:  # noqa: BLE001 - not written yet
        return 0
    match = re.fullmatch(r"epoch_(\d+)", directory or "")
    return int(match.group(1)) if match else TOTAL_EPOCHS


def _client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def _only_run(uri: str):
    client = _client(uri)
    experiments = client.search_experiments()
    runs = client.search_runs([e.experiment_id for e in experiments])
    assert len(runs) == 1, [(r.info.run_id, r.info.status) for r in runs]
    return runs[0]


def _steps(uri: str, run_id: str, key: str, unique: bool = True) -> list[int]:
    steps = [m.step for m in _client(uri).get_metric_history(run_id, key)]
    return sorted(set(steps) if unique else steps)
