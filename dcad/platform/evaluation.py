"""Evaluate a model (a directory, runs:/ or models:/ URI) on a dataset's test split, restricted to its categories:
`dcad eval`, the pipeline's evaluate step and the promotion gate."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable


@dataclass
class Evaluation:
    result: dict  # per-category and mean metrics
    model: Any  # the DRDC evaluated
    index: Any  # the dataset's DatasetIndex
    skipped: list[str]  # categories of the data the model was not trained on


def evaluate_model(model: str | Path, data: Path, device: str = "auto", *, tracking_uri: str | None = None,
                   overrides: list[str] | None = None, batch_size: int | None = None, evaluator=None,
                   on_batch: Callable[[int, int], None] | None = None) -> Evaluation:
    from dcad.core.inference import evaluate, open_test_set
    from dcad.core.model.drdc import with_inference_overrides
    from dcad.core.model.model_dir import load_model
    from dcad.platform.mlflow_model import resolve_model_dir
    from dcad.core.device import resolve_device

    dev = resolve_device(device)
    net = with_inference_overrides(load_model(resolve_model_dir(str(model), tracking_uri), dev), overrides)
    index, skipped, test = open_test_set(data, net)
    result = evaluate(net, test, batch_size or net.cfg.train.eval_batch_size, dev, evaluator=evaluator, on_batch=on_batch)
    return Evaluation(result, net, index, skipped)


def uri_evaluator(tracking_uri: str, device: str = "auto", on_start: Callable[[str], None] | None = None):
    """An `Evaluate` for `registry.promote`: the metrics of the model at a URI on a dataset."""

    def run(uri: str, data: Path) -> dict:
        if on_start:
            on_start(uri)
        return evaluate_model(uri, data, device, tracking_uri=tracking_uri).result

    return run
