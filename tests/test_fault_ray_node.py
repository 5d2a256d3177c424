"""A Ray worker *node* killed (SIGKILL to its `ray start`, raylet and workers) under a running 2-worker sweep
trial, on a three-node loopback cluster: the trial resumes from its last checkpoint on the nodes left, and the
sweep finishes with the trial's epochs logged once. And a 2-worker training whose worker nodes are all lost:
it says it waits, and goes on from its last checkpoint once a node joins."""

from __future__ import annotations

import json
import re
import signal

import pytest
import yaml
from fixtures_mlflow import sqlite_uri
from ray_helpers import _signal_group, descendants, ray_dataset, read_cmdline, start_cluster, start_dcad, wait_for  # noqa: F401

pytestmark = pytest.mark.slow
OVERRIDES = {
    "data.categories": ["brick", "hex_nut"], "train.base.epochs": 2, "train.base.iters_per_epoch": 8,
    "train.refiner.epochs": 3, "train.refiner.iters_per_epoch": 20, "train.validate_refiner": False,
    "train.val_max_images": 16,
}


@pytest.fixture(scope="module")
def three_nodes():
    cluster = start_cluster([1, 1, 1])  # 2 workers of 0.75 CPU: never on one node
    yield cluster
    cluster.stop()


def _committed_epoch(trial_dirs) -> int:
    for directory in trial_dirs():
        snapshot = directory / "checkpoint_manager_snapshot.json"
        if snapshot.is_file():
            try:
                name = json.loads(snapshot.read_text())["latest_checkpoint_result"]["checkpoint_dir_name"]
                meta = json.loads((directory / name / "dcad_checkpoint.json").read_text())
                return int(meta.get("epoch", 0))
            except (ValueError, KeyError, TypeError, OSError):
                return 0
    return 0


def _actors(cluster, index: int) -> list[str]:
    return [" ".join(read_cmdline(p) or ())[:40] for p in descendants(cluster.nodes[index].proc.pid)
            if (read_cmdline(p) or [""])[0].startswith("ray::")]


def _hosts_the_trial(cluster, index: int) -> bool:
    """Whether the node runs the Tune trial (its function actor) or the report queue: killing those is a
    different fault (the trial itself lost), not a worker node lost under a running trial."""
    names = [" ".join(read_cmdline(p) or ()) for p in descendants(cluster.nodes[index].proc.pid)]
    return any(key in n for n in names for key in ("ImplicitFunc", "QueueActor", "TrainController"))


def test_a_killed_worker_node_under_a_two_worker_trial(three_nodes, tmp_path):
    from dcad.core.data import synthesize
    from dcad.platform.mlflow_store import mlflow_client

    data = tmp_path / "data"
    synthesize(data, seed=0, size=64, categories=["brick", "hex_nut"], n_train=12, n_test=8)
    uri, storage = sqlite_uri(tmp_path / "store"), tmp_path / "sweeps"
    spec = tmp_path / "node.yaml"
    spec.write_text(yaml.safe_dump({
        "name": "node", "base": {"profile": "tiny", "overrides": OVERRIDES}, "dataset": str(data),
        "search_space": {"refiner.class_conditioning": {"type": "categorical", "choices": [True, False]}},
        "objective": [{"metric": "val_pixel_auroc", "mode": "max"}], "num_trials": 1, "max_concurrent": 1,
        "resources": {"workers": 2, "cpus_per_worker": 0.75}, "storage": str(storage), "tracking_uri": uri,
        "experiment": "node-fault",
    }, sort_keys=False))
    out = tmp_path / "node.json"
    sweep = start_dcad(["sweep", str(spec), "--address", three_nodes.address, "--json", str(out)], tmp_path / "node.log")
    trial_dirs = lambda: sorted((storage / "node" / "trials").glob("trial-*"))  # noqa: E731
    try:
        wait_for(lambda: _committed_epoch(trial_dirs) >= 3 or sweep.proc.poll() is not None, 400, "a refiner checkpoint")
        assert sweep.proc.poll() is None, sweep.text()[-4000:]
        victim = next((i for i in (1, 2) if three_nodes.train_worker_pids(node_index=i) and not _hosts_the_trial(three_nodes, i)), None)
        if victim is None:  # Ray put a worker beside the trial on every non-head node: losing it is another fault
            pytest.skip(f"no worker node without the trial itself: {({i: _actors(three_nodes, i) for i in range(3)})}")
        killed_at = _committed_epoch(trial_dirs)
        _signal_group(three_nodes.nodes[victim].proc.pid, signal.SIGKILL)
        assert sweep.wait(timeout=600) == 0, sweep.text()[-5000:]
    finally:
        if sweep.proc.poll() is None:
            sweep.kill()
    log = " ".join(sweep.text().split())
    result = json.loads(out.read_text())
    assert [t["status"] for t in result["trials"]] == ["finished"], result["trials"]
    resumed = re.search(r"dcad: resuming from the checkpoint of epoch (\d+)/5", log)
    assert resumed and int(resumed.group(1)) >= killed_at >= 3, log[-4000:]  # not from scratch: from the last checkpoint
    client = mlflow_client(uri)
    run = client.get_run(result["trials"][0]["run_id"])
    assert run.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "refiner_train_loss")] == [1, 2, 3]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "base_train_loss")] == [1, 2]


def test_a_training_whose_workers_no_longer_fit_waits_with_a_clear_line_until_a_node_joins(
        three_nodes, ray_dataset, tmp_path):  # noqa: F811
    storage = tmp_path / "ckpt"
    args = ["train", "--profile", "tiny", "--data", str(ray_dataset), "--output", str(tmp_path / "model"), "--no-track",
            "--set", "train.val_max_images=8", "--set", "train.validate_refiner=false",
            "--set", "train.base.epochs=2", "--set", "train.base.iters_per_epoch=20",
            "--set", "train.refiner.epochs=2", "--set", "train.refiner.iters_per_epoch=6",
            "--address", three_nodes.address, "--workers", "2", "--cpus-per-worker", "0.75",
            "--storage", str(storage), "--name", "shrink"]
    run = start_dcad(args, tmp_path / "shrink.log")
    try:
        wait_for(lambda: _committed_epoch(lambda: [storage / "shrink"]) >= 1 or run.proc.poll() is not None, 300,
                 "checkpoint 1")
        assert run.proc.poll() is None, run.text()[-4000:]
        others = [i for i in range(1, len(three_nodes.nodes)) if three_nodes.nodes[i].proc.poll() is None]
        if any(_hosts_the_trial(three_nodes, i) for i in others):  # the run's controller: a different fault
            pytest.skip(f"the TrainController is not on the head node: {({i: _actors(three_nodes, i) for i in others})}")
        for index in others:  # only the head's 1 CPU is left: 2 workers of 0.75 CPU do not fit
            _signal_group(three_nodes.nodes[index].proc.pid, signal.SIGKILL)
        wait_for(lambda: "waiting: 2 worker(s)" in run.text() or run.proc.poll() is not None, 180, "the waiting line")
        assert run.proc.poll() is None, run.text()[-4000:]
        three_nodes.add_node(1)
        assert run.wait(timeout=400) == 0, run.text()[-5000:]
    finally:
        if run.proc.poll() is None:
            run.kill()
    log = " ".join(run.text().split())
    assert re.search(r"waiting: 2 worker\(s\) × \(0\.75 CPU\) = 1\.5 CPU no longer fit Ray cluster at \S+, which has "
                     r"1 CPU and 0 GPU on 1 node\(s\)", log), log[-4000:]
    assert "has room again (2 CPU and 0 GPU on 2 node(s)" in log
    resumed = re.search(r"dcad: resuming from the checkpoint of epoch (\d+)/4", log)
    assert resumed and int(resumed.group(1)) >= 1, log[-4000:]
    history = json.loads((tmp_path / "model" / "history.json").read_text())["epochs"]
    assert [e["global_epoch"] for e in history] == [1, 2, 3, 4]
