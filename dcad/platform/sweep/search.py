"""The sweep's search: a define-by-run space on a persistent Optuna study, as a Tune searcher, and ASHA.

Each Optuna trial is tagged with its Ray trial id; one that Ctrl-C cut is told nothing, and a restored searcher
tells it when the resumed sweep finishes it (docs/cluster.md, "The search"). List choices go to Optuna as JSON.
"""

from __future__ import annotations

import json
import logging
import math
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import optuna
from optuna.trial import TrialState
from ray.tune.search import Searcher

from dcad.platform.errors import PlatformError, describe
from dcad.platform.sweep.reporting import DONE_KEY
from dcad.platform.sweep.spec import Choice, SweepSpec

logger = logging.getLogger(__name__)

RAY_TRIAL_ID = "ray_trial_id"  # user attr of each Optuna trial: the Tune trial it was asked for


def encode_choice(choice: Choice) -> Any:
    return json.dumps(choice) if isinstance(choice, list) else choice


def decode_params(config: dict[str, Any]) -> dict[str, Choice]:
    """A trial's sampled values as config overrides (JSON-encoded list choices decoded)."""
    return {k: json.loads(v) if isinstance(v, str) and v.startswith("[") else v for k, v in config.items()}


def active(when: dict[str, Any] | None, chosen: dict[str, Any]) -> bool:
    """Whether a parameter's `when` condition holds for the values drawn so far."""
    for other, wanted in (when or {}).items():
        values = wanted if isinstance(wanted, list) else [wanted]
        if other not in chosen or chosen[other] not in [encode_choice(v) for v in values]:
            return False
    return True


@dataclass
class SearchSpace:
    """The define-by-run space: a conditional parameter is drawn only when its `when` holds (picklable)."""

    params: dict[str, dict[str, Any]]  # key -> the parameter's spec as plain data

    @classmethod
    def from_spec(cls, spec: SweepSpec) -> "SearchSpace":
        return cls({key: p.model_dump(mode="json") for key, p in spec.search_space.items()})

    def __call__(self, trial: optuna.Trial) -> None:
        chosen: dict[str, Any] = {}
        for key, p in self.params.items():
            if not active(p.get("when"), chosen):
                continue
            if p["type"] == "float":
                chosen[key] = trial.suggest_float(key, p["low"], p["high"], log=p["log"])
            elif p["type"] == "int":
                chosen[key] = trial.suggest_int(key, p["low"], p["high"], step=p["step"], log=p["log"])
            else:
                chosen[key] = trial.suggest_categorical(key, [encode_choice(c) for c in p["choices"]])


class SweepSearch(Searcher):
    """Optuna ask/tell on the study `study_name` in `storage` (a URL; None: in memory), for one objective (str
    `metric` and `mode`) or several (lists). Picklable: the study is reconnected from the URL."""

    def __init__(self, space: Callable[[optuna.Trial], dict[str, Any] | None], metric: str | list[str] | None = None,
                 mode: str | list[str] | None = None, sampler: optuna.samplers.BaseSampler | None = None,
                 study_name: str | None = None, storage: str | None = None) -> None:
        super().__init__(metric=metric, mode=mode)
        self.space, self.sampler, self.study_name, self.storage_url = space, sampler, study_name, storage
        self.trials: dict[str, int] = {}  # Ray trial id -> Optuna trial number
        self.told: set[str] = set()
        self._study: optuna.Study | None = None
        if self.metric and self.mode:
            self._connect()  # create (or load) it now: a bad storage fails before the sweep starts

    @property
    def study(self) -> optuna.Study:
        return self._connect()

    def _connect(self) -> optuna.Study:
        if self._study is None:
            if not self.metric or not self.mode:
                raise RuntimeError("SweepSearch: metric and mode must be set before the study is used")
            modes = self.mode if isinstance(self.mode, list) else [self.mode]
            self._study = optuna.create_study(
                study_name=self.study_name, storage=self.storage_url, sampler=self.sampler,
                pruner=optuna.pruners.NopPruner(), directions=["minimize" if m == "min" else "maximize" for m in modes],
                load_if_exists=True)
            self.study_name = self._study.study_name
            self._reconcile()
        return self._study

    def _reconcile(self) -> None:
        """The study's RUNNING trials with a Ray trial id are ours to tell; its finished ones are told already."""
        for frozen in self._study.get_trials(deepcopy=False):
            trial_id = frozen.user_attrs.get(RAY_TRIAL_ID)
            if trial_id is None or self.trials.get(trial_id, frozen.number) != frozen.number:
                continue
            if frozen.state == TrialState.RUNNING:
                self.trials[trial_id] = frozen.number
                self.told.discard(trial_id)
            elif trial_id in self.trials:
                self.told.add(trial_id)

    def set_search_properties(self, metric, mode, config: dict, **spec) -> bool:
        """Fill in Tune's metric and mode where none was given; False for a Tune `param_space` (define-by-run)."""
        self._metric, self._mode = self.metric or metric, self.mode or mode
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
        if trial_id not in self.trials or trial_id in self.told:
            logger.debug(f"Optuna: trial {trial_id} not suggested by this searcher, or told already; ignored")
            return
        if error:
            return self._tell(trial_id, None, TrialState.FAIL)
        if not result or result.get(DONE_KEY) != 1.0:
            return self._tell(trial_id, None, TrialState.PRUNED)
        metrics = self.metric if isinstance(self.metric, list) else [self.metric]
        values = [result.get(m) for m in metrics]
        if any(not isinstance(v, (int, float)) or math.isnan(v) for v in values):
            logger.warning(f"Optuna: trial {trial_id} finished without a number for {metrics} ({values}); recorded as failed")
            return self._tell(trial_id, None, TrialState.FAIL)
        values = [float(v) for v in values]
        self._tell(trial_id, values if isinstance(self.metric, list) else values[0], TrialState.COMPLETE)

    def _tell(self, trial_id: str, values: float | list[float] | None, state: TrialState) -> None:
        try:
            self.study.tell(self.trials[trial_id], values, state=state)
        except Exception as err:  # noqa: BLE001 - the sweep goes on
            logger.warning(f"Optuna: trial {trial_id} not recorded as {state.name} ({err})")
        self.told.add(trial_id)

    def __getstate__(self) -> dict[str, Any]:  # saved with the experiment; the study is reloaded from its URL
        return {**self.__dict__, "_study": None}

    def save(self, checkpoint_path: str) -> None:
        Path(checkpoint_path).write_bytes(pickle.dumps(self.__getstate__()))

    def restore(self, checkpoint_path: str) -> None:
        self.__dict__.update(pickle.loads(Path(checkpoint_path).read_bytes()))
        if self.metric and self.mode:
            self._connect()  # reload the study and rebuild its RUNNING trials' ids


def build_sampler(spec: SweepSpec) -> optuna.samplers.BaseSampler:
    samplers = {"tpe": optuna.samplers.TPESampler, "random": optuna.samplers.RandomSampler,
                "nsga2": optuna.samplers.NSGAIISampler, "cmaes": optuna.samplers.CmaEsSampler}
    if spec.sampler.type == "cmaes":
        try:
            import cmaes  # noqa: F401  (CmaEsSampler needs it)
        except ImportError:
            raise PlatformError("sampler.type cmaes needs the 'cmaes' package (pip install cmaes), or use tpe") from None
    return samplers[spec.sampler.type](seed=spec.sampler.seed)


def build_searcher(spec: SweepSpec, storage_url: str) -> SweepSearch:
    """`SweepSearch` over the spec's space, on the persistent study `spec.name` at `storage_url`."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # the sweep reports each trial itself
    if storage_url.startswith("sqlite:///"):
        Path(storage_url[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
    try:
        optuna.storages.RDBStorage(storage_url)  # the searcher keeps the URL; this checks it opens
    except Exception as err:  # noqa: BLE001 - sqlalchemy / optuna errors on a bad URL
        raise PlatformError(f"study_storage {storage_url}: cannot open the Optuna storage ({describe(err)})") from None
    metrics, modes = [o.metric for o in spec.objective], [o.mode for o in spec.objective]
    if not spec.multi_objective:
        metrics, modes = metrics[0], modes[0]
    return SweepSearch(SearchSpace.from_spec(spec), metrics, modes, build_sampler(spec), spec.name, storage_url)


def build_scheduler(spec: SweepSpec):
    """ASHA clocked by the global training epoch (None: no early stopping). A trial that reaches `max_t` is not
    stopped (`stop_last_trials=False`), so a surviving trial always ends with its final model and evaluation."""
    if spec.early_stopping is None:
        return None
    from ray.tune.schedulers import ASHAScheduler

    es, (metric, mode) = spec.early_stopping, spec.asha_metric
    return ASHAScheduler(time_attr="epoch", metric=metric, mode=mode, max_t=es.max_t, grace_period=es.grace_period,
                         reduction_factor=es.reduction_factor, stop_last_trials=False)

