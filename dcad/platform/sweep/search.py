"""Search machinery of a sweep: the define-by-run space, the Optuna sampler and study, the searcher and ASHA.

The search space is sampled define-by-run (`SearchSpace.__call__`), so a conditional parameter is only
drawn when its `when` condition holds. Categorical choices that are lists (e.g. `refiner.timesteps`) go
to Optuna as their JSON text and are decoded in the trial (`decode_params`). The Optuna study lives in a
persistent storage (sqlite in the sweep directory by default), so `optuna-dashboard URL` can read it
while the sweep runs and a resumed sweep continues the same study.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dcad.platform.errors import PlatformError
from dcad.platform.sweep.spec import Choice, SweepSpec, decode_choice, encode_choice

STUDY_DB = "optuna.db"


@dataclass
class SearchSpace:
    """Define-by-run space for `SweepSearch` (picklable: Tune saves it with the searcher's state)."""

    params: dict[str, dict[str, Any]]  # key -> the parameter's spec as plain data

    @classmethod
    def from_spec(cls, spec: SweepSpec) -> "SearchSpace":
        return cls({key: p.model_dump(mode="json") for key, p in spec.search_space.items()})

    def __call__(self, trial) -> None:
        chosen: dict[str, Any] = {}
        for key, p in self.params.items():
            if active(p.get("when"), chosen):
                chosen[key] = suggest(trial, key, p)


def active(when: dict[str, Any] | None, chosen: dict[str, Any]) -> bool:
    """Whether a parameter's `when` condition holds for the values drawn so far."""
    for other, wanted in (when or {}).items():
        values = wanted if isinstance(wanted, list) else [wanted]
        if other not in chosen or chosen[other] not in [encode_choice(v) for v in values]:
            return False
    return True


def suggest(trial, key: str, p: dict[str, Any]) -> Any:
    if p["type"] == "float":
        return trial.suggest_float(key, p["low"], p["high"], log=p["log"])
    if p["type"] == "int":
        return trial.suggest_int(key, p["low"], p["high"], step=p["step"], log=p["log"])
    return trial.suggest_categorical(key, [encode_choice(c) for c in p["choices"]])


def decode_params(config: dict[str, Any]) -> dict[str, Choice]:
    """A trial's sampled values as config overrides (JSON-encoded list choices decoded)."""
    return {key: decode_choice(value) for key, value in config.items()}


# ---- Optuna ------------------------------------------------------------------------------------------
def build_sampler(spec: SweepSpec):
    import optuna

    seed = spec.sampler.seed
    kind = spec.sampler.type
    if kind == "tpe":
        return optuna.samplers.TPESampler(seed=seed)
    if kind == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if kind == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed)
    try:
        import cmaes  # noqa: F401  (CmaEsSampler needs it)
    except ImportError:
        raise PlatformError("sampler.type cmaes needs the 'cmaes' package (pip install cmaes), or use tpe") from None
    return optuna.samplers.CmaEsSampler(seed=seed)


def study_url(spec: SweepSpec, sweep_dir: Path | None) -> str:
    """The Optuna storage URL: the spec's `study_storage`, else a sqlite file in the (local) sweep directory."""
    if spec.study_storage:
        return spec.study_storage
    if sweep_dir is None:
        from dcad.platform.store import dcad_home

        sweep_dir = dcad_home() / "sweeps" / spec.name  # the sweep itself lives on S3; sqlite cannot
    return f"sqlite:///{sweep_dir.resolve() / STUDY_DB}"


def build_searcher(spec: SweepSpec, storage_url: str):
    """`SweepSearch` over the define-by-run space, on the persistent study `spec.name` at `storage_url`."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # the sweep reports each trial itself
    if storage_url.startswith("sqlite:///"):
        Path(storage_url[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
    try:
        optuna.storages.RDBStorage(storage_url)  # the searcher keeps the URL; this checks it opens
    except Exception as err:  # noqa: BLE001 - sqlalchemy / optuna errors on a bad URL
        raise PlatformError(f"study_storage {storage_url}: cannot open the Optuna storage ({str(err).splitlines()[0]})") from None
    metrics = [o.metric for o in spec.objective]
    modes = [o.mode for o in spec.objective]
    from dcad.platform.sweep.searcher import SweepSearch

    return SweepSearch(
        space=SearchSpace.from_spec(spec),
        metric=metrics if spec.multi_objective else metrics[0],
        mode=modes if spec.multi_objective else modes[0],
        sampler=build_sampler(spec),
        study_name=spec.name,
        storage=storage_url,
    )


def build_scheduler(spec: SweepSpec):
    """ASHA on a validation metric, clocked by the global training epoch (None: no early stopping).

    Trials that reach `max_t` are not stopped (`stop_last_trials=False`): they finish their training,
    so the final model, its calibration and its test evaluation always exist for a surviving trial.
    """
    if spec.early_stopping is None:
        return None
    from ray.tune.schedulers import ASHAScheduler

    es = spec.early_stopping
    metric, mode = spec.asha_metric
    return ASHAScheduler(
        time_attr="epoch",
        metric=metric,
        mode=mode,
        max_t=es.max_t,
        grace_period=es.grace_period,
        reduction_factor=es.reduction_factor,
        stop_last_trials=False,
    )


def open_study(spec: SweepSpec, storage_url: str):
    """The sweep's Optuna study (read-only use: plots and counts); None when it does not exist yet."""
    import optuna

    try:
        return optuna.load_study(study_name=spec.name, storage=storage_url)
    except KeyError:
        return None
