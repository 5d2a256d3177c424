"""Evaluate a model given by MLflow URI on a dataset's test split (what the promotion gate compares)."""

from __future__ import annotations

from pathlib import Path
from typing import Callable


def evaluate_model_dir(model_dir: Path, data: Path, device: str = "auto") -> dict:
    """Per-category and mean metrics of the model directory on `data`'s test split (the model's categories)."""
    from dcad.core.inference import evaluate, open_test_set
    from dcad.core.model.model_dir import load_model
    from dcad.train.pipeline import resolve_device

    dev = resolve_device(device)
    net = load_model(model_dir, dev)
    _, _, test = open_test_set(data, net)
    return evaluate(net, test, net.cfg.train.eval_batch_size, dev)


def uri_evaluator(tracking_uri: str, device: str = "auto", on_start: Callable[[str], None] | None = None):
    """An `Evaluate` for `registry.promote`: downloads the model at the URI, then evaluates it."""
    from dcad.platform.model_uri import download_model_dir

    def run(uri: str, data: Path) -> dict:
        if on_start:
            on_start(uri)
        return evaluate_model_dir(download_model_dir(uri, tracking_uri), data, device)

    return run
