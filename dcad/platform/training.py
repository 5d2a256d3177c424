"""What `dcad train`, the pipeline's train step and a sweep trial share: log inputs, save → evaluate → log, end the run."""

from __future__ import annotations

import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

BOOKKEEPING = ("global_epoch", "epoch_seconds")  # history keys that are not metrics


def metric_history(history: list[dict]) -> list[dict]:
    """Per-epoch entries without the keys that are not metrics, for `RunTracker.log_history`."""
    return [{k: v for k, v in entry.items() if k not in BOOKKEEPING} for entry in history]


def log_training_inputs(tracker, cfg, data_root: Path | str, digest: str | None, model_dir: Path | None = None) -> None:
    """What a training starts from: the flattened config, the dataset, config.yaml."""
    tracker.log_params(cfg.flat())
    tracker.set_tags({"dcad.profile": cfg.profile, "dcad.model_dir": str(model_dir.resolve()) if model_dir else None})
    if digest:
        tracker.log_dataset(Path(data_root).resolve(), digest, "train")
    with tempfile.TemporaryDirectory(prefix="dcad-") as tmp:
        config = Path(tmp) / "config.yaml"
        config.write_text(cfg.to_yaml())
        tracker.log_artifacts(config)


def finish_training(model, output: Path, splits, data: Path, *, tracker=None, **evaluation) -> dict:
    """`save_and_evaluate(..., **evaluation)` (model directory, test metrics, report), then log it all to the run (if any)."""
    from dcad.platform.tracking import log_model_outputs
    from dcad.train.model_output import save_and_evaluate

    result = save_and_evaluate(model, output, splits, data, **evaluation)
    if tracker is not None:
        tracker.log_history(metric_history(evaluation["history"]))
        log_model_outputs(tracker, output)
    return result


@contextmanager
def ended_run(tracker, model_dir: Path | None = None, *, strict: bool = True) -> Iterator:
    """End the run with the block: FAILED on an error, KILLED on Ctrl-C, else FINISHED once every write reached
    the store (with `strict`, a TrackingLostError naming `model_dir` when some did not). No-op for None."""
    if tracker is None:
        yield None
        return
    try:
        yield tracker
    except BaseException as err:
        tracker.finish("KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED")
        raise
    if tracker.lost is None:
        tracker.finish("FINISHED")
    if strict and tracker.lost is not None:
        raise tracker.lost_error(model_dir)
