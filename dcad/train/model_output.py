"""After training: write the model directory, evaluate it once on the test split, write its reports.

Shared by `dcad train` (in-process or on Ray), the pipeline's train step and sweep trials, so every
trained model directory holds the same files: the model (`save_model`), `metrics.json` (test metrics,
validation metrics, timing) and `history.json` (per-epoch metrics).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

from dcad.core.data import Splits
from dcad.core.inference import evaluate
from dcad.core.json_io import write_json
from dcad.core.metrics import AnomalyEvaluator
from dcad.core.model.drdc import DRDC
from dcad.core.model.model_dir import save_model


def save_and_evaluate(
    model: DRDC,
    output: Path,
    splits: Splits,
    data: Path,
    *,
    train_seconds: float,
    val_metrics: dict[str, float],
    history: list[dict],
    device,
    evaluator: AnomalyEvaluator | None = None,
    on_batch: Callable[[int, int], None] | None = None,
) -> dict:
    """Save `model` to `output`, score the test split once, write metrics.json/history.json; returns the result."""
    extra = {"dataset_digest": splits.index.digest(), "dataset_root": str(Path(data).resolve()),
             "train_seconds": round(train_seconds, 1)}
    save_model(model, output, extra=extra)
    started = time.perf_counter()
    result = evaluate(model, splits.test, model.cfg.train.eval_batch_size, device, evaluator=evaluator, on_batch=on_batch)
    eval_seconds = time.perf_counter() - started
    result["timing"] = {"train_seconds": train_seconds, "eval_seconds": eval_seconds,
                        "ms_per_image": 1000 * eval_seconds / max(1, len(splits.test))}
    result["validation"] = val_metrics
    write_json(output / "metrics.json", result)
    write_json(output / "history.json", {"epochs": history})
    return result
