"""`SweepSearch`: Ray's OptunaSearch, except that a trial stopped early by ASHA is recorded as PRUNED.

OptunaSearch tells Optuna a scheduler-stopped trial as COMPLETE with its last, partial value (and, with
several objectives, fails on the NaN a partial result holds), which would feed early-stopped trials to
the sampler as if they had finished. Here a trial counts as complete only once its last result says it
trained and was evaluated (`trial_done`); errors stay FAIL as before. A trial interrupted by Ctrl-C is
not told anything, so it stays RUNNING in the study and is told when the resumed sweep finishes it.
"""

from __future__ import annotations

import logging

from optuna.trial import TrialState
from ray.tune.search.optuna import OptunaSearch

from dcad.platform.sweep.reporting import DONE_KEY

logger = logging.getLogger(__name__)


class SweepSearch(OptunaSearch):
    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        finished = bool(result) and result.get(DONE_KEY) == 1.0
        if error or finished or trial_id in self._completed_trials or trial_id not in self._ot_trials:
            super().on_trial_complete(trial_id, result, error)
            return
        try:
            self._ot_study.tell(self._ot_trials[trial_id], None, state=TrialState.PRUNED)
        except Exception as err:  # noqa: BLE001 - as OptunaSearch does: the sweep goes on
            logger.warning(f"Optuna: trial {trial_id} not recorded as pruned ({err})")
        self._completed_trials.add(trial_id)
