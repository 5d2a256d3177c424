"""Batched inference over datasets and evaluation into the leak-free metrics."""

from __future__ import annotations

from typing import Callable, Iterator

import torch
from torch.utils.data import DataLoader, Dataset

from dcad.core.metrics import AnomalyEvaluator
from dcad.core.model.drdc import DRDC, Prediction

BatchCallback = Callable[[int, int], None]  # (images done, images total)


def loader_for(dataset: Dataset, batch_size: int) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size, shuffle=False)


def predict_batches(
    model: DRDC,
    dataset: Dataset,
    batch_size: int,
    device: torch.device | str = "cpu",
    *,
    on_batch: BatchCallback | None = None,
) -> Iterator[tuple[dict, Prediction]]:
    """Yield (batch, prediction) pairs; predictions are moved to the CPU."""
    model.eval()
    total, done = len(dataset), 0
    for batch in loader_for(dataset, batch_size):
        images = batch["image"].to(device)
        pred = model(images, batch["category_index"].to(device))
        pred = Prediction(*(t.cpu() if t is not None else None for t in vars(pred).values()))
        done += len(images)
        if on_batch:
            on_batch(done, total)
        yield batch, pred


def evaluate(
    model: DRDC,
    dataset: Dataset,
    batch_size: int,
    device: torch.device | str = "cpu",
    *,
    track_defect_types: bool = False,
    on_batch: BatchCallback | None = None,
    evaluator: AnomalyEvaluator | None = None,
) -> dict:
    """Metrics per category and their unweighted mean (docs/design.md §3); maps are streamed, never kept."""
    evaluator = evaluator or AnomalyEvaluator(track_defect_types=track_defect_types)
    for batch, pred in predict_batches(model, dataset, batch_size, device, on_batch=on_batch):
        evaluator.update(
            pred.image_score,
            batch["label"],
            pred.anomaly_map,
            batch["mask"],
            list(batch["category"]),
            list(batch["defect_type"]),
        )
    return evaluator.compute()


def open_test_set(root, model: DRDC):
    """(index, categories of the data the model was not trained on, test dataset) of the data at `root`,
    restricted to the model's categories; DatasetError if nothing is left to test."""
    from dcad.core.data import AnomalyDataset, open_for_model
    from dcad.core.errors import DatasetError

    index, skipped = open_for_model(root, model.categories)
    test = AnomalyDataset(index.test, model.categories, model.image_size)
    if len(test) == 0:
        raise DatasetError(f"{root}: the test split is empty")
    return index, skipped, test
