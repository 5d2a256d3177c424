"""The files of a trained model directory: the model, `metrics.json` (test, validation, timing), `history.json`
and `report/` (tables, ROC/PRO plots, heatmaps)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

from dcad.core.data import Splits
from dcad.core.inference import evaluate, predict_batches
from dcad.core.json_io import write_json
from dcad.core.metrics import AnomalyEvaluator
from dcad.core.model.drdc import DRDC
from dcad.core.model.model_dir import save_model
from dcad.train.report import write_report


def save_and_evaluate(model: DRDC, output: Path, splits: Splits, data: Path, *, train_seconds: float,
                      val_metrics: dict[str, float], history: list[dict], device, evaluator: AnomalyEvaluator | None = None,
                      on_batch: Callable[[int, int], None] | None = None, dataset_digest: str | None = None,
                      time_on_validation: bool = False) -> dict:
    """Save `model` to `output`, score the test split once, write metrics.json, history.json and report/; the result.

    `ms_per_image` is the test evaluation's time per image or, with `time_on_validation`, that of one prediction
    pass over the validation images (a sweep objective: nothing from the test split may be one).
    """
    extra = {"dataset_digest": dataset_digest or splits.index.digest(), "dataset_root": str(Path(data).resolve()),
             "train_seconds": round(train_seconds, 1)}
    save_model(model, output, extra=extra)
    batch_size = model.cfg.train.eval_batch_size
    ms_per_image = None
    if time_on_validation:
        started = time.perf_counter()
        for _ in predict_batches(model, splits.val, batch_size, device):
            pass
        ms_per_image = 1000 * (time.perf_counter() - started) / max(1, len(splits.val))
    started = time.perf_counter()
    evaluator = evaluator or AnomalyEvaluator()  # kept for the report's curves
    result = evaluate(model, splits.test, batch_size, device, evaluator=evaluator, on_batch=on_batch)
    eval_seconds = time.perf_counter() - started
    if ms_per_image is None:
        ms_per_image = 1000 * eval_seconds / max(1, len(splits.test))
    result["timing"] = {"train_seconds": train_seconds, "eval_seconds": eval_seconds, "ms_per_image": ms_per_image}
    result["validation"] = val_metrics
    write_json(output / "metrics.json", result)
    write_json(output / "history.json", {"epochs": history})
    write_report(output / "report", result, evaluator, model, splits.index.test)
    return result
