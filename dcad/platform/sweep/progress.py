"""Progress of a running sweep: trials done, running and pending, and the best so far (Tune's table stays off).

`SweepProgress` is a Tune callback on the driver. It keeps no state of its own (Tune pickles callbacks
into the experiment and restores them on `--resume`): counts and the best trial are computed from the
trials Tune passes in, and lines go to the `dcad.sweep` logger, which the runner points at its `log`.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Callable

from ray.tune import Callback

from dcad.platform.sweep.reporting import DONE_KEY

LOGGER = "dcad.sweep"


@dataclass
class ProgressCounts:
    done: int
    running: int
    pending: int
    failed: int


def counts(trials: list, total: int, ending=None, ending_status: str = "TERMINATED") -> ProgressCounts:
    """Counts over `trials`; `ending` (a trial whose completion is being reported) counts with `ending_status`."""
    status = [ending_status if t is ending else t.status for t in trials]
    done = sum(s == "TERMINATED" for s in status)
    failed = sum(s == "ERROR" for s in status)
    running = sum(s == "RUNNING" for s in status)
    return ProgressCounts(done, running, max(0, total - done - failed - running), failed)


def best_so_far(trials: list, metric: str, mode: str) -> tuple[Any, float] | None:
    """The finished trial with the best `metric` (the sweep's primary objective), or None."""
    scored = []
    for t in trials:
        result = t.last_result or {}
        value = result.get(metric)
        if result.get(DONE_KEY) == 1.0 and isinstance(value, (int, float)) and math.isfinite(value):
            scored.append((t, float(value)))
    if not scored:
        return None
    return (max if mode == "max" else min)(scored, key=lambda item: item[1])


def short_params(config: dict[str, Any], limit: int | None = 4) -> str:
    """`guidance_scale=1.5, timesteps=[100, 250]`: the last part of each dotted key."""
    items = [f"{k.rsplit('.', 1)[-1]}={_fmt(v)}" for k, v in list(config.items())[:limit]]
    return ", ".join(items)


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


class SweepProgress(Callback):
    """One line per trial event, with the counts and the best trial so far."""

    def __init__(self, total: int, metric: str, mode: str) -> None:
        self.total, self.metric, self.mode = total, metric, mode

    def _say(self, trials: list, event: str, ending=None, ending_status: str = "TERMINATED") -> None:
        c = counts(trials, self.total, ending, ending_status)
        best = best_so_far(trials, self.metric, self.mode)
        shown = f"best {self.metric}={best[1]:.4f} ({best[0].trial_id})" if best else "no finished trial yet"
        failed = f", {c.failed} failed" if c.failed else ""
        logging.getLogger(LOGGER).info(
            f"{event}  [{c.done}/{self.total} done, {c.running} running, {c.pending} pending{failed}; {shown}]"
        )

    def on_trial_start(self, iteration: int, trials: list, trial, **info) -> None:
        self._say(trials, f"trial {trial.trial_id} started ({short_params(trial.config)})", trial, "RUNNING")

    def on_trial_result(self, iteration: int, trials: list, trial, result: dict, **info) -> None:
        if result.get(DONE_KEY) == 1.0:
            return
        value = result.get(self.metric)
        if isinstance(value, (int, float)) and math.isfinite(value):
            logging.getLogger(LOGGER).info(
                f"trial {trial.trial_id} epoch {int(result.get('epoch', 0))} ({result.get('stage', '')}): {self.metric}={value:.4f}"
            )

    def on_trial_complete(self, iteration: int, trials: list, trial, **info) -> None:
        result = trial.last_result or {}
        what = "finished" if result.get(DONE_KEY) == 1.0 else "stopped early (ASHA)"
        if result.get(DONE_KEY) == 1.0 and result.get("started_from") not in (None, "nothing"):
            what += f" (started from {result['started_from']})"
        self._say(trials, f"trial {trial.trial_id} {what}", ending=trial)

    def on_trial_error(self, iteration: int, trials: list, trial, **info) -> None:
        self._say(trials, f"trial {trial.trial_id} failed", ending=trial, ending_status="ERROR")


class LogHandler(logging.Handler):
    """Sends the `dcad.sweep` logger's lines to a callable (the CLI's rich console, or print)."""

    def __init__(self, log: Callable[[str], None]) -> None:
        super().__init__(logging.INFO)
        self.log = log

    def emit(self, record: logging.LogRecord) -> None:
        self.log(record.getMessage())


def attach(log: Callable[[str], None]) -> LogHandler:
    logger = logging.getLogger(LOGGER)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    handler = LogHandler(log)
    logger.addHandler(handler)
    return handler


def detach(handler: LogHandler) -> None:
    logging.getLogger(LOGGER).removeHandler(handler)
