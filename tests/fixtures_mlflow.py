"""Helpers for the MLflow tests: run the CLI in-process, fake model directories, a tiny dataset."""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest


@dataclass
class CliResult:
    code: int
    out: str
    err: str


def run_dcad(capsys, *args: str) -> CliResult:
    """`dcad ARGS` through the real entry point (`main`: one-line errors, exit codes), in this process."""
    capsys.readouterr()
    code = run_main(*args)
    captured = capsys.readouterr()
    return CliResult(code, captured.out, captured.err)


def sqlite_uri(directory: Path) -> str:
    directory.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{directory / 'mlflow.db'}"


def fake_model_dir(path: Path, categories: list[str], digest: str = "d" * 64, data_root: Path | None = None) -> Path:
    """A directory that passes `read_metadata` (enough to log and register; not loadable as a network)."""
    path.mkdir(parents=True, exist_ok=True)
    meta = {
        "format": "dcad-model",
        "format_version": 1,
        "dcad_version": "0.1.0",
        "categories": categories,
        "image_size": 32,
        "image_threshold": 1.0,
        "pixel_threshold": 1.0,
        "dataset_digest": digest,
    }
    if data_root is not None:
        meta["dataset_root"] = str(data_root)
    (path / "dcad_model.json").write_text(json.dumps(meta))
    (path / "config.yaml").write_text("profile: tiny\n")
    (path / "model.safetensors").write_bytes(b"\0" * 64)
    (path / "checkpoints").mkdir(exist_ok=True)
    (path / "checkpoints" / "base.pt").write_bytes(b"resumable state, not for serving")
    return path


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory) -> Path:
    """A small synthetic MVTec-layout dataset (2 categories), shared by the registry tests."""
    from dcad.core.data import CATEGORIES, synthesize

    root = tmp_path_factory.mktemp("synth") / "data"
    synthesize(root, seed=0, size=32, categories=CATEGORIES[:2], n_train=4, n_test=3)
    return root


# ---- one trained tiny model per session --------------------------------------------------------------
TRAIN_OVERRIDES = (
    "train.base.epochs=2",
    "train.base.iters_per_epoch=10",
    "train.refiner.epochs=1",
    "train.refiner.iters_per_epoch=4",
    "train.validate_refiner=false",
)


@dataclass
class TrainedModel:
    data: Path
    model_dir: Path
    tracking_uri: str
    run_id: str
    model_uri: str  # models:/<model id>


def run_main(*args: str) -> int:
    """`dcad ARGS` through the real entry point (`main`: one-line errors, exit codes), in this process, without
    capturing its output; returns the exit code."""
    from dcad.cli.app import main

    argv, sys.argv = sys.argv, ["dcad", *args]
    try:
        main()
        return 0
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:
        sys.argv = argv


def synth_dataset(root: Path, categories: int = 2, n_train: int = 8, n_test: int = 6) -> Path:
    from dcad.core.data import CATEGORIES, synthesize

    synthesize(root, seed=0, size=64, categories=CATEGORIES[:categories], n_train=n_train, n_test=n_test)
    return root


def train_args(data: Path, output: Path, *extra: str) -> list[str]:
    args = ["train", "--data", str(data), "--output", str(output), "--profile", "tiny"]
    for item in TRAIN_OVERRIDES:
        args += ["--set", item]
    return [*args, *extra]


@pytest.fixture(scope="session")
def trained(tmp_path_factory) -> TrainedModel:
    """`dcad train` once per session, tracked in a local sqlite store."""
    from dcad.platform.mlflow_store import mlflow_client

    root = tmp_path_factory.mktemp("trained")
    data = synth_dataset(root / "data")
    uri = sqlite_uri(root / "store")
    code = run_main(*train_args(data, root / "model", "--tracking-uri", uri, "--experiment", "e2e", "--run-name", "tiny"))
    assert code == 0, "dcad train failed (see the captured output)"
    client = mlflow_client(uri)
    run = client.search_runs([client.get_experiment_by_name("e2e").experiment_id])[0]
    return TrainedModel(data, root / "model", uri, run.info.run_id, run.data.tags["dcad.model_uri"])


@pytest.fixture()
def decoy_global_store(tmp_path):
    """MLflow's global URIs point at a store that must never be touched: dcad passes its URI explicitly."""
    import mlflow

    from mlflow.tracking import _tracking_service

    decoy = tmp_path / "decoy-never-created" / "mlflow.db"
    # the module globals, not get_*_uri(): restoring a resolved default would also export it as
    # MLFLOW_TRACKING_URI (set_tracking_uri does) and leak it into later tests' subprocesses
    before = (_tracking_service.utils._tracking_uri, mlflow.get_registry_uri(), os.environ.get("MLFLOW_TRACKING_URI"))
    mlflow.set_tracking_uri(f"sqlite:///{decoy}")
    mlflow.set_registry_uri(f"sqlite:///{decoy}")
    yield decoy
    mlflow.set_tracking_uri(before[0])
    mlflow.set_registry_uri(before[1])
    if before[2] is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = before[2]
    assert not decoy.parent.exists(), "something used MLflow's global tracking URI instead of dcad's"
