"""The driver's progress lines: counts that add up while trials start and end."""

from __future__ import annotations

import logging
from types import SimpleNamespace

from dcad.platform.sweep.progress import LOGGER, SweepProgress
from dcad.platform.sweep.reporting import DONE_KEY


def _trial(trial_id: str, status: str, value: float | None = None):
    result = {DONE_KEY: 1.0, "val_pixel_auroc": value} if value is not None else {}
    return SimpleNamespace(trial_id=trial_id, status=status, config={"refiner.timesteps": [50]}, last_result=result)


def test_a_starting_trial_counts_as_running_not_pending(caplog):
    done, running, starting = _trial("a", "TERMINATED", 0.8), _trial("b", "RUNNING"), _trial("c", "PENDING")
    progress = SweepProgress(total=4, metric="val_pixel_auroc", mode="max")
    with caplog.at_level(logging.INFO, logger=LOGGER):
        progress.on_trial_start(0, [done, running, starting], starting)
    line = caplog.messages[-1]
    assert "trial c started (timesteps=[50])" in line
    assert "[1/4 done, 2 running, 1 pending; best val_pixel_auroc=0.8000 (a)]" in line


def test_a_finishing_trial_counts_as_done(caplog):
    running, ending = _trial("b", "RUNNING"), _trial("c", "RUNNING", 0.9)
    progress = SweepProgress(total=3, metric="val_pixel_auroc", mode="max")
    with caplog.at_level(logging.INFO, logger=LOGGER):
        progress.on_trial_complete(0, [running, ending], ending)
    assert "[1/3 done, 1 running, 1 pending; best val_pixel_auroc=0.9000 (c)]" in caplog.messages[-1]
