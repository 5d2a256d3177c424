"""`SweepSearch`: a Tune searcher that drives a persistent Optuna study through Optuna's public ask/tell API.

Each Tune trial asks the study for one Optuna trial, samples the define-by-run space on it and records its
Ray trial id as the user attr `ray_trial_id`. A trial counts as complete only once its last result says it
trained and was evaluated (`DONE_KEY`): it is told COMPLETE with its objective value(s); one that ended
earlier (stopped by ASHA) is told PRUNED, never its partial value; an error is told FAIL. A trial interrupted
by Ctrl-C is not told anything, so it stays RUNNING and is told when the resumed sweep finishes it: the saved
state holds the storage URL, the study name and the trial ids, and a restored searcher reloads the study and
rebuilds the trial ids of its RUNNING trials from their user attrs.
"""

from __future__ import annotations

import logging
import math
import pickle
from typing import Any, Callable

import optuna
from optuna.trial import TrialState
from ray.tune.search import Searcher

from dcad.platform.sweep.reporting import DONE_KEY

logger = logging.getLogger(__name__)

RAY_TRIAL_ID = "ray_trial_id"  # user attr of each Optuna trial: the Tune trial it was asked for


class SweepSearch(Searcher):
    """Define-by-run Optuna search on the study `study_name` in `storage` (a URL; None: in memory).

    `metric` and `mode` are one objective (str) or several (lists, in the spec's order). Picklable: the
    study is reconnected from the URL when needed.
    """

    def __init__(
        self,
        space: Callable[[optuna.Trial], dict[str, Any] | None],
        metric: str | list[str] | None = None,
        mode: str | list[str] | None = None,
        sampler: optuna.samplers.BaseSampler | None = None,
        study_name: str | None = None,
        storage: str | None = None,
    ) -> None:
        super().__init__(metric=metric, mode=mode)
        if storage is not None and not isinstance(storage, str):
            raise TypeError("SweepSearch: storage must be an Optuna storage URL (str) or None")
        self.space = space
        self.sampler = sampler
        self.study_name = study_name
        self.storage_url = storage
        self.trials: dict[str, int] = {}  # Ray trial id -> Optuna trial number
        self.told: set[str] = set()
        self._study: optuna.Study | None = None
        if self.metric and self.mode:
            self._connect()  # create (or load) it now: a bad storage fails before the sweep starts

    # ---- the study -------------------------------------------------------------------------------------
    @property
    def study(self) -> optuna.Study:
        return self._connect()

    def _connect(self) -> optuna.Study:
        if self._study is None:
            if not self.metric or not self.mode:
                raise RuntimeError("SweepSearch: metric and mode must be set before the study is used")
            modes = self.mode if isinstance(self.mode, list) else [self.mode]
            self._study = optuna.create_study(
                study_name=self.study_name,
                storage=self.storage_url,
                sampler=self.sampler,
                pruner=optuna.pruners.NopPruner(),
                directions=["minimize" if m == "min" else "maximize" for m in modes],
                load_if_exists=True,
            )
            if self.study_name is None:
                self.study_name = self._study.study_name
            self._reconcile()
        return self._study

    def _reconcile(self) -> None:
        """Align the trial ids with the study: its RUNNING trials with a Ray trial id are ours to tell, the
        finished ones are told already."""
        for frozen in self._study.get_trials(deepcopy=False):
            trial_id = frozen.user_attrs.get(RAY_TRIAL_ID)
            if trial_id is None or self.trials.get(trial_id, frozen.number) != frozen.number:
                continue
            if frozen.state == TrialState.RUNNING:
                self.trials[trial_id] = frozen.number
                self.told.discard(trial_id)
            elif trial_id in self.trials:
                self.told.add(trial_id)

    # ---- Tune's calls -----------------------------------------------------------------------------------
    def set_search_properties(self, metric: str | list[str] | None, mode: str | list[str] | None,
                              config: dict, **spec) -> bool:
        """Fill in Tune's metric and mode where none was given (set ones are kept). The space is define-by-run,
        so a Tune `param_space` cannot be taken: False when one is given."""
        if metric and not self.metric:
            self._metric = metric
        if mode and not self.mode:
            self._mode = mode
        return not config

    def suggest(self, trial_id: str) -> dict[str, Any] | None:
        study = self.study
        if trial_id in self.trials:  # asked before: the same parameters
            return dict(study.get_trials(deepcopy=False)[self.trials[trial_id]].params)
        trial = study.ask()
        trial.set_user_attr(RAY_TRIAL_ID, trial_id)
        self.trials[trial_id] = trial.number
        try:
            extra = self.space(trial)
        except BaseException:
            self._tell(trial_id, None, TrialState.FAIL)
            raise
        return {**trial.params, **(extra or {})}

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if trial_id not in self.trials:
            logger.debug(f"Optuna: trial {trial_id} was not suggested by this searcher; ignored")
            return
        if trial_id in self.told:
            logger.debug(f"Optuna: trial {trial_id} was told already; ignored")
            return
        if error:
            self._tell(trial_id, None, TrialState.FAIL)
        elif result and result.get(DONE_KEY) == 1.0:
            metrics = self.metric if isinstance(self.metric, list) else [self.metric]
            values = [result.get(m) for m in metrics]
            if any(not _is_number(v) for v in values):
                logger.warning(f"Optuna: trial {trial_id} finished without a number for {metrics} "
                               f"({values}); recorded as failed")
                self._tell(trial_id, None, TrialState.FAIL)
            else:
                values = [float(v) for v in values]
                self._tell(trial_id, values if isinstance(self.metric, list) else values[0], TrialState.COMPLETE)
        else:
            self._tell(trial_id, None, TrialState.PRUNED)

    def _tell(self, trial_id: str, values: float | list[float] | None, state: TrialState) -> None:
        try:
            self.study.tell(self.trials[trial_id], values, state=state)
        except Exception as err:  # noqa: BLE001 - the sweep goes on
            logger.warning(f"Optuna: trial {trial_id} not recorded as {state.name} ({err})")
        self.told.add(trial_id)

    # ---- saved with the experiment -----------------------------------------------------------------------
    def get_state(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "_study"}

    def set_state(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._study = None
        if self.metric and self.mode:
            self._connect()  # reload the study and rebuild its RUNNING trials' ids

    def save(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "wb") as f:
            pickle.dump(self.get_state(), f)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as f:
            self.set_state(pickle.load(f))

    def __getstate__(self) -> dict[str, Any]:
        return self.get_state()

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._study = None  # reconnected when first used


def _is_number(value: Any) -> bool:
    try:
        return not math.isnan(float(value))
    except (TypeError, ValueError):
        return False
