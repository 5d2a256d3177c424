"""The driver's progress lines (Tune's table stays off), on the `dcad.sweep` logger that `lines_to` points at a `log`."""

from __future__ import annotations

import logging
from contextlib import contextmanager
from typing import Any, Callable, Iterator

from ray.tune import Callback

from dcad.platform.sweep.reporting import DONE_KEY, is_finite

LOGGER = "dcad.sweep"
logger = logging.getLogger(LOGGER)


def short_params(config: dict[str, Any], limit: int = 4) -> str:
    """`guidance_scale=1.5, timesteps=[100, 250]`: the last part of each dotted key."""
    return ", ".join(f"{k.rsplit('.', 1)[-1]}={f'{v:.4g}' if isinstance(v, float) else v}" for k, v in list(config.items())[:limit])


class SweepProgress(Callback):
    """One line per trial event, with the counts and the best trial (primary objective) so far; stateless, as Tune
    pickles callbacks with the experiment."""

    def __init__(self, total: int, metric: str, mode: str) -> None:
        self.total, self.metric, self.mode = total, metric, mode

    def _say(self, trials: list, event: str, ending=None, ending_status: str = "TERMINATED") -> None:
        status = [ending_status if t is ending else t.status for t in trials]  # `ending`: the trial being reported
        done, failed, running = (status.count(s) for s in ("TERMINATED", "ERROR", "RUNNING"))
        pending = max(0, self.total - done - failed - running)
        scored = [(t, float(t.last_result[self.metric])) for t in trials
                  if (t.last_result or {}).get(DONE_KEY) == 1.0 and is_finite(t.last_result.get(self.metric))]
        best = (max if self.mode == "max" else min)(scored, key=lambda item: item[1], default=None)
        shown = f"best {self.metric}={best[1]:.4f} ({best[0].trial_id})" if best else "no finished trial yet"
        failures = f", {failed} failed" if failed else ""
        logger.info(f"{event}  [{done}/{self.total} done, {running} running, {pending} pending{failures}; {shown}]")

    def on_trial_start(self, iteration: int, trials: list, trial, **info) -> None:
        self._say(trials, f"trial {trial.trial_id} started ({short_params(trial.config)})", trial, "RUNNING")

    def on_trial_result(self, iteration: int, trials: list, trial, result: dict, **info) -> None:
        value = result.get(self.metric)
        if result.get(DONE_KEY) != 1.0 and is_finite(value):
            logger.info(f"trial {trial.trial_id} epoch {int(result.get('epoch', 0))} ({result.get('stage', '')}): "
                        f"{self.metric}={value:.4f}")

    def on_trial_complete(self, iteration: int, trials: list, trial, **info) -> None:
        result = trial.last_result or {}
        what = "finished" if result.get(DONE_KEY) == 1.0 else "stopped early (ASHA)"
        if result.get(DONE_KEY) == 1.0 and result.get("started_from") not in (None, "nothing"):
            what += f" (started from {result['started_from']})"
        self._say(trials, f"trial {trial.trial_id} {what}", ending=trial)

    def on_trial_error(self, iteration: int, trials: list, trial, **info) -> None:
        self._say(trials, f"trial {trial.trial_id} failed", ending=trial, ending_status="ERROR")


class _ToLog(logging.Handler):
    def __init__(self, log: Callable[[str], None]) -> None:
        super().__init__(logging.INFO)
        self.log = log

    def emit(self, record: logging.LogRecord) -> None:
        self.log(record.getMessage())


@contextmanager
def lines_to(log: Callable[[str], None]) -> Iterator[None]:
    """Inside the block, the `dcad.sweep` logger's lines go to `log` (the CLI's console, or print) only."""
    handler = _ToLog(log)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)
