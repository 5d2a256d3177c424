"""Tracking options and glue shared by `dcad train`, `dcad eval --log` and `dcad log`."""

from __future__ import annotations

import functools
import tempfile
from pathlib import Path
from typing import Callable, Optional

import typer

from dcad.cli.console import err_console
from dcad.platform.store import DEFAULT_EXPERIMENT

EXPERIMENT_OPTION = typer.Option(DEFAULT_EXPERIMENT, "--experiment", "-e", help="MLflow experiment name.")
RUN_NAME_OPTION = typer.Option(None, "--run-name", help="MLflow run name (default: generated).")
TRACKING_URI_OPTION = typer.Option(
    None, "--tracking-uri", envvar="MLFLOW_TRACKING_URI", help="MLflow tracking URI (default: sqlite store under ./.dcad/)."
)
NO_TRACK_OPTION = typer.Option(False, "--no-track", help="Do not log to MLflow.")

_OPEN: list["CommandTracking"] = []


class CommandTracking:
    """The MLflow run of one CLI command, or nothing when tracking is off (every method is then a no-op)."""

    def __init__(self, tracker=None) -> None:
        self.tracker = tracker
        self._evaluator = None
        if tracker is not None:
            _OPEN.append(self)

    @classmethod
    def begin(cls, enabled: bool, tracking_uri: Optional[str], experiment: str, run_name: Optional[str], kind: str) -> "CommandTracking":
        """Check the store and open the run before any work starts (TrackingError if unreachable)."""
        if not enabled:
            return cls(None)
        from dcad.platform.tracking import TrackingOptions, start_run

        tracker = start_run(TrackingOptions(tracking_uri, experiment, run_name), kind)
        err_console.print(f"[cyan]▸[/] MLflow run {tracker.run_id} in experiment '{experiment}' ({_where(tracker)})")
        return cls(tracker)

    @property
    def enabled(self) -> bool:
        return self.tracker is not None

    def evaluator(self, track_defect_types: bool = False):
        """An AnomalyEvaluator kept for the ROC/PRO plots (None when not tracking)."""
        if not self.enabled:
            return None
        from dcad.core.metrics import AnomalyEvaluator

        self._evaluator = AnomalyEvaluator(track_defect_types=track_defect_types)
        return self._evaluator

    def wrap_epoch(self, on_epoch: Optional[Callable]) -> Callable:
        def both(report) -> None:
            if on_epoch:
                on_epoch(report)
            if self.enabled:
                self.tracker.log_epoch(report)

        return both

    # ---- train ---------------------------------------------------------------------------------------
    def log_training_inputs(self, cfg, index, data_root: Path, output: Path) -> None:
        if not self.enabled:
            return
        t = self.tracker
        t.log_params(cfg.flat())
        t.set_tags({"dcad.profile": cfg.profile, "dcad.model_dir": str(output.resolve())})
        t.log_dataset(data_root.resolve(), index.digest(), "train")
        with tempfile.TemporaryDirectory(prefix="dcad-") as tmp:
            config = Path(tmp) / "config.yaml"
            config.write_text(cfg.to_yaml())
            t.log_artifact(config)

    def finish_training(self, output: Path, result: dict, evaluator, model, test_records) -> None:
        """Report files into OUTPUT/report, then metrics, artifacts and the model to MLflow."""
        if not self.enabled:
            return
        from dcad.platform.figures import write_report
        from dcad.platform.tracking import REPORT_DIR, log_model_outputs

        err_console.print("[cyan]▸[/] report and MLflow logging")
        write_report(output / REPORT_DIR, result, evaluator, model, test_records)
        log_model_outputs(self.tracker, output)
        self._close(output)

    # ---- eval --------------------------------------------------------------------------------------
    def finish_evaluation(self, model_ref: str, data_root: Path, index, result: dict, model) -> None:
        if not self.enabled:
            return
        from dcad.platform.figures import write_report
        from dcad.platform.tracking import REPORT_DIR

        t = self.tracker
        t.log_params({"model": model_ref, "data": str(data_root)})
        t.set_tags({"dcad.model_source": model_ref})
        t.log_dataset(data_root.resolve(), result.get("dataset_digest") or index.digest(), "evaluation")
        t.log_evaluation(result, "test")
        with tempfile.TemporaryDirectory(prefix="dcad-report-") as tmp:
            write_report(Path(tmp), result, self._evaluator, model, index.test)
            t.log_artifacts(Path(tmp), REPORT_DIR)
        self._close(None)

    # ---- end -----------------------------------------------------------------------------------------
    def _close(self, output: Optional[Path]) -> None:
        t = self.tracker
        if self in _OPEN:
            _OPEN.remove(self)
        if t.lost is not None:
            raise t.lost_error(output)
        t.finish("FINISHED")
        if t.lost is not None:
            raise t.lost_error(output)
        link = t.link
        err_console.print(f"logged to MLflow run {t.run_id}" + (f": {link}" if link else f" ({t.uri})"))

    def fail(self, status: str = "FAILED") -> None:
        if self.enabled and self in _OPEN:
            _OPEN.remove(self)
            self.tracker.finish(status)


def end_orphaned_training_runs(tracking_uri: Optional[str], experiment: str, output: Path) -> None:
    """`dcad train --resume`: runs of this model directory left RUNNING by a process that died end FAILED."""
    from dcad.platform.store import open_store
    from dcad.platform.tracking import end_orphaned_runs

    uri, client = open_store(tracking_uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return
    model_dir = str(output.resolve()).replace("'", "\\'")
    ended = end_orphaned_runs(client, found.experiment_id, f"tags.`dcad.model_dir` = '{model_dir}'",
                              "its process died before it ended the run; found by dcad train --resume")
    for run_id in ended:
        err_console.print(f"[yellow]▸[/] MLflow run {run_id} of {output} was left RUNNING by a process that died: marked FAILED")


def _where(tracker) -> str:
    return tracker.link or tracker.uri


def tracked(command: Callable) -> Callable:
    """Mark the command's open MLflow run FAILED (KILLED on Ctrl+C) when the command raises."""

    @functools.wraps(command)
    def run(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except KeyboardInterrupt:
            _close_open("KILLED")
            raise
        except BaseException:
            _close_open("FAILED")
            raise

    return run


def _close_open(status: str) -> None:
    while _OPEN:
        _OPEN[-1].fail(status)
