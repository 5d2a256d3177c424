"""Clear one-line errors for distributed training, checked before any Ray process starts."""

from __future__ import annotations

import socket
import time

import pytest

from fixtures_mlflow import run_dcad
from ray_helpers import ray_dataset  # noqa: F401
from dcad.platform.ray_cluster import ClusterError, NodeCapacity, WorkerShape, check_capacity, check_reachable

TRAIN = ["train", "--profile", "tiny", "--no-track"]


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens once the socket is closed


def test_capacity_counts_cpus_per_node_not_only_in_total():
    nodes = [NodeCapacity(1.5, 0), NodeCapacity(0.5, 0)]
    check_capacity(3, WorkerShape(0.5), nodes, "the cluster")  # 1.5 → three halves on the first node
    with pytest.raises(ClusterError, match=r"2 worker\(s\) × \(1 CPU\) = 2 CPU do not fit the cluster: it has 2 CPU and 0 GPU on 2 node\(s\)"):
        check_capacity(2, WorkerShape(1.0), nodes, "the cluster")  # 2 CPUs in total, but not 1 + 1


def test_capacity_error_says_what_is_available():
    nodes = [NodeCapacity(2, 0), NodeCapacity(1, 0)]
    with pytest.raises(ClusterError, match=r"4 CPU do not fit .*: it has 3 CPU and 0 GPU on 2 node\(s\) \(2 CPU/0 GPU, 1 CPU/0 GPU\)"):
        check_capacity(4, WorkerShape(1.0), nodes, "Ray cluster at x")
    with pytest.raises(ClusterError, match=r"2 GPU do not fit .*it has 3 CPU and 0 GPU"):
        check_capacity(2, WorkerShape(0.5, 1.0), nodes, "Ray cluster at x")
    check_capacity(2, WorkerShape(0.5, 1.0), [NodeCapacity(2, 1), NodeCapacity(2, 1)], "two GPU nodes")


def test_unreachable_address_fails_fast_with_one_line():
    port = closed_port()
    started = time.monotonic()
    with pytest.raises(ClusterError, match=rf"--address 127.0.0.1:{port}: no Ray cluster reachable at 127.0.0.1:{port} \(Connection refused\)"):
        check_reachable(f"127.0.0.1:{port}")
    assert time.monotonic() - started < 10
    with pytest.raises(ClusterError, match="expected HOST:PORT"):
        check_reachable("just-a-host")


def test_cli_unreachable_address(capsys, tmp_path, ray_dataset):  # noqa: F811
    port = closed_port()
    result = run_dcad(capsys, *TRAIN, "--data", str(ray_dataset), "--output", str(tmp_path / "m"),
                      "--workers", "2", "--address", f"127.0.0.1:{port}")
    assert result.code == 2
    lines = [line for line in result.err.splitlines() if line.startswith("error:")]
    assert lines == [f"error: --address 127.0.0.1:{port}: no Ray cluster reachable at 127.0.0.1:{port} (Connection refused)"]
    assert "Traceback" not in result.err


def test_cli_unwritable_storage(capsys, tmp_path, ray_dataset):  # noqa: F811
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where a directory should be")
    result = run_dcad(capsys, *TRAIN, "--data", str(ray_dataset), "--output", str(tmp_path / "m"),
                      "--workers", "2", "--storage", str(blocker / "ckpt"))
    assert result.code == 2
    assert f"error: --storage {blocker}/ckpt: not writable" in result.err
    assert "Traceback" not in result.err


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--resume"], "--resume with --workers needs --name NAME"),
        (["--name", "bad/name"], "--name 'bad/name': use letters, digits"),
        (["--cpus-per-worker", "0"], "--cpus-per-worker 0: must be positive"),
    ],
)
def test_cli_option_errors(capsys, tmp_path, ray_dataset, extra, message):  # noqa: F811
    result = run_dcad(capsys, *TRAIN, "--data", str(ray_dataset), "--output", str(tmp_path / "m"), "--workers", "2", *extra)
    assert result.code == 2
    assert f"error: {message}" in result.err


def test_capacity_watch_says_once_when_workers_stop_fitting_and_once_when_they_fit_again(monkeypatch):
    import time

    import dcad.platform.ray_cluster as rc

    two, one = [NodeCapacity(1, 0), NodeCapacity(1, 0)], [NodeCapacity(1, 0)]
    states = iter([two, one, one, one, two, two])
    monkeypatch.setattr(rc, "cluster_nodes", lambda: next(states, two))
    lines: list[str] = []
    with rc.CapacityWatch(2, WorkerShape(0.75), "Ray cluster at x", lines.append, interval_s=0.02):
        time.sleep(0.4)
    assert lines == [
        "waiting: 2 worker(s) × (0.75 CPU) = 1.5 CPU no longer fit Ray cluster at x, which has 1 CPU and 0 GPU on "
        "1 node(s) (1 CPU/0 GPU); Ray Train starts them again from the last checkpoint when a node joins "
        "(Ctrl-C stops; the same command resumes)",
        "Ray cluster at x has room again (2 CPU and 0 GPU on 2 node(s) (1 CPU/0 GPU, 1 CPU/0 GPU)): "
        "the workers restart from the last checkpoint",
    ]
