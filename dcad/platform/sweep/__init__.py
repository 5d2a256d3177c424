"""`dcad sweep`: Ray Tune + Optuna over a DRDC config's conditioning and noise-schedule parameters.

Python API (what the pipeline calls):

    spec = load_sweep_spec("sweeps/quickstart.yaml")
    result = run_sweep(spec, resume=False, address=None, tracking_uri=None, log=print)
    result.parent_run_id, result.best_trial, result.registered_version, result.trials

Modules: `spec` (the YAML spec), `search` (the define-by-run space, Optuna sampler, ASHA), `searcher`
(the Tune searcher on the Optuna study), `stages` (which stages the trials share; the shared base branch),
`trial` (the Tune function trainable), `runner` (Tuner, resume, Ctrl-C), `reporting` (MLflow parent, best
trial, Pareto front, plots, registry), `progress` (the live progress lines), `cleanup` (placement groups of
stopped multi-worker trials), `state` (the sweep directory). Ray is imported only when a sweep runs, so loading and validating a spec is cheap.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

from dcad.platform.sweep.reporting import BestTrial, SweepResult, TrialRecord
from dcad.platform.sweep.spec import SweepSpec, SweepSpecError, load_sweep_spec

if TYPE_CHECKING:
    from dcad.platform.sweep.runner import SweepPlan


def run_sweep(
    spec: SweepSpec,
    *,
    resume: bool = False,
    address: str | None = None,
    tracking_uri: str | None = None,
    storage: str | None = None,
    log: Callable[[str], None] = print,
) -> SweepResult:
    """Run the sweep (or continue it with `resume=True`); see `dcad.platform.sweep.runner.run_sweep`."""
    from dcad.platform.sweep import runner

    return runner.run_sweep(spec, resume=resume, address=address, tracking_uri=tracking_uri, storage=storage, log=log)


def plan_sweep(spec: SweepSpec, **kwargs) -> "SweepPlan":
    """The checked plan of a sweep, without starting Ray (what `--dry-run` prints)."""
    from dcad.platform.sweep import runner

    return runner.plan_sweep(spec, **kwargs)


__all__ = ["BestTrial", "SweepResult", "SweepSpec", "SweepSpecError", "TrialRecord", "load_sweep_spec", "plan_sweep", "run_sweep"]
