"""`plan_sweep` and `run_sweep`: checks before Ray starts, the Tune experiment, its outcome (docs/cluster.md)."""

from __future__ import annotations

import os
import signal
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

from dcad.core.clock import now_utc
from dcad.platform.sweep import reporting
from dcad.platform.sweep.reporting import Log, SweepResult
from dcad.platform.sweep.spec import TRIAL_CPUS, SweepSpec
from dcad.platform.sweep.state import SPEC_FILE, TUNE_DIR, SweepDir, SweepError, SweepState, spec_digest, sweep_dir
from dcad.platform.tracking_buffer import call_when_reachable

NO_TUNE_SIGINT = "TUNE_DISABLE_SIGINT_HANDLER"


@dataclass
class SweepPlan:
    """What a sweep will do, decided before Ray starts (what `--dry-run` prints)."""

    spec: SweepSpec
    where: SweepDir
    state: SweepState | None  # of an earlier run under this name
    resume: bool
    tracking_uri: str | None
    address: str | None
    study_storage: str
    total_epochs: int
    note: str | None = None  # why the sweep runs under another name than the spec's

    def lines(self) -> list[str]:
        from dcad.platform.sweep.stages import stage_plan

        s, r, es = self.spec, self.spec.resources, self.spec.early_stopping
        gpu = f", {r.gpus_per_worker:g} GPU" if r.gpus_per_worker else ""
        per_trial = (f"{r.cpus_per_worker:g} CPU{gpu}, training in the trial itself" if r.workers == 1 else
                     f"a Ray Train run of {r.workers} workers × ({r.cpus_per_worker:g} CPU{gpu}) + {TRIAL_CPUS:g} CPU for the trial")
        stopping = (f"ASHA on {s.asha_metric[0]} ({s.asha_metric[1]}), grace {es.grace_period}, max_t {es.max_t} epochs, "
                    f"reduction {es.reduction_factor:g}") if es else "none"
        registration = ""
        if s.register_best:
            floor = f" if its val image and pixel AUROC reach {s.register_floor:g}" if s.register_floor else ""
            registration = f"; best model registered as '{s.register_best}' @challenger{floor}"
        lines = [self.note] if self.note else []
        lines += [
            f"sweep '{s.name}' ({'resume' if self.resume else 'new'}): {s.num_trials} trials, at most {s.max_concurrent} at a time",
            f"base: {s.base.profile or s.base.config} with {len(s.base.overrides)} override(s); {self.total_epochs} epochs per trial",
            f"dataset: {s.dataset_path()}",
            f"objective: {', '.join(f'{m} ({mode})' for m, mode in s.objectives)}; sampler {s.sampler.type} (seed {s.sampler.seed})",
            f"early stopping: {stopping}",
            stage_plan(s),
            f"resources per trial: {per_trial}; cluster: {self.address or 'a local Ray instance'}",
            f"time budget: {f'{s.time_budget_s:g} s' if s.time_budget_s else 'none'}",
            f"storage: {self.where.describe()}; Optuna study '{s.name}' in {self.study_storage}",
            f"tracking: {self.tracking_uri or 'default store'}, experiment '{s.experiment}'{registration}",
            "search space:",
        ]
        for key, p in s.search_space.items():
            rng = f"{p.choices}" if p.type == "categorical" else f"[{p.low}, {p.high}]{' log' if p.log else ''}"
            lines.append(f"  {key}: {p.type} {rng}" + (f" when {p.when}" if p.when else ""))
        return lines


def plan_sweep(spec: SweepSpec, *, resume: bool = False, address: str | None = None, tracking_uri: str | None = None,
               storage: str | None = None) -> SweepPlan:
    """Check the spec's data, storage and the earlier state; nothing is started or written."""

    if not spec.dataset_path().is_dir():
        raise SweepError(f"dataset {spec.dataset_path()}: no such directory (create it with: dcad data synth {spec.dataset})")
    runs = series_runs(spec, storage)
    note, state = None, None
    if resume and not runs:
        raise SweepError(f"nothing to resume: no sweep '{spec.name}' in {sweep_dir(spec, storage).describe()} "
                         "(run it without --resume)")
    if resume:
        spec, where, state = runs[-1]
    else:
        if runs:
            latest = runs[-1][0].name
            spec = numbered(spec, len(runs) + 1)
            note = (f"sweep '{latest}' has run before: this is a new sweep '{spec.name}' "
                    f"(dcad sweep SPEC --resume continues '{latest}' instead)")
        where = sweep_dir(spec, storage)
    if state is not None and state.spec_digest != spec_digest(spec):
        raise SweepError(f"sweep '{spec.name}' in {where.describe()} was started from a different spec "
                         "(search space, objectives, base or trial count changed); use a new name")
    uri = choose_tracking_uri(spec, state, tracking_uri)
    study = state.study_storage if state else where.study_url(spec)
    return SweepPlan(spec, where, state, resume, uri, address, study, spec.base_config().total_epochs, note)


def numbered(spec: SweepSpec, n: int) -> SweepSpec:
    """Run `n` of a spec: its own name for the first, NAME-n after that."""
    series = spec.series or spec.name
    return spec if n == 1 else spec.model_copy(update={"name": f"{series}-{n}", "series": series})


def series_runs(spec: SweepSpec, storage: str | None) -> list[tuple[SweepSpec, SweepDir, SweepState]]:
    """The earlier runs of this spec under its storage (NAME, NAME-2, NAME-3 …), oldest first."""
    runs = []
    for n in range(1, 10_000):
        run = numbered(spec, n)
        where = sweep_dir(run, storage)
        state = where.read_state()
        if state is None:
            return runs
        runs.append((run, where, state))
    raise SweepError(f"sweep '{spec.name}': too many earlier runs in {sweep_dir(spec, storage).describe()}")


def choose_tracking_uri(spec: SweepSpec, state: SweepState | None, explicit: str | None) -> str | None:
    """The sweep's MLflow store (None: the default): a resumed sweep's own (another `--tracking-uri` is refused), else
    `--tracking-uri`, else `MLFLOW_TRACKING_URI`, else the spec's."""
    from dcad.platform.secrets import redact
    from dcad.platform.mlflow_store import requested_tracking_uri

    if state is not None and state.tracking_uri:
        if explicit and explicit != state.tracking_uri:
            raise SweepError(f"--tracking-uri {redact(explicit)}: sweep '{spec.name}' logs to "
                             f"{redact(state.tracking_uri)}; a resumed sweep keeps its store (drop --tracking-uri)")
        return state.tracking_uri
    return requested_tracking_uri(explicit, spec.tracking_uri)


def run_sweep(spec: SweepSpec, *, log: Log = print, **options) -> SweepResult:
    """Run the sweep that `plan_sweep(spec, **options)` plans (with `resume=True`, continue it)."""
    from dcad.platform.sweep.progress import lines_to

    plan = plan_sweep(spec, **options)
    with lines_to(log):
        return _run(plan, log)


def _run(plan: SweepPlan, log: Log) -> SweepResult:
    from dcad.core.data import open_dataset
    from dcad.platform.mlflow_store import resolve_tracking_uri
    from dcad.platform.ray_cluster import connect
    from dcad.platform.storage import check_writable
    from dcad.platform.sweep.stages import train_shared_base

    spec, where = plan.spec, plan.where
    check_writable(where.storage)
    uri = resolve_tracking_uri(plan.tracking_uri)
    digest = open_dataset(spec.dataset_path()).digest()
    concurrency = fit_concurrency(spec, connect(plan.address), log)  # before anything is written: a misfit leaves no state
    parent = reporting.open_parent(spec, uri, plan.state.parent_run_id if plan.state else None, log)
    if plan.state is not None:
        reporting.end_orphaned_trials(parent, log)
    state = plan.state or SweepState(spec.name, spec_digest(spec), plan.study_storage, parent.run_id, uri, now_utc())
    if plan.state is None:
        where.write_state(state)
        where.write_text(SPEC_FILE, spec.to_yaml())
    for line in plan.lines():
        log(line)
    started = time.time()
    try:
        span = train_shared_base(spec, where.root, digest, concurrency, log) if spec.shares_base else None
        trials, interrupted = _fit(plan, state, parent.run_id, uri, digest, concurrency, log)
    except BaseException as err:
        parent.finish("KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED")
        raise
    result = _record(plan, state, parent, trials, interrupted, uri, time.time() - started, log)
    result.stage_seconds = {"shared_base": span} if span else {}
    return result


def fit_concurrency(spec: SweepSpec, where: str, log: Log) -> int:
    """ClusterError if one trial cannot fit; the number of concurrent trials that fit (at most max_concurrent)."""
    from dcad.platform.ray_cluster import ClusterError, WorkerShape, check_capacity, cluster_nodes, fits

    r = spec.resources
    shape, nodes = WorkerShape(r.cpus_per_worker, r.gpus_per_worker), cluster_nodes()
    try:
        check_capacity(r.workers, shape, nodes, where)
    except ClusterError as err:
        hint = "lower resources.workers, resources.cpus_per_worker or resources.gpus_per_worker in the sweep spec"
        raise ClusterError(f"one trial needs {str(err).split('; lower')[0]}; {hint}") from None
    fitting = next((n for n in range(spec.max_concurrent, 1, -1) if fits(n * r.workers, shape, nodes)), 1)
    if fitting < spec.max_concurrent:
        log(f"max_concurrent {spec.max_concurrent} lowered to {fitting}: {where} holds {fitting} trial(s) of "
            f"{shape.describe(r.workers)} at a time")
    return fitting


def _trainable(plan: SweepPlan, parent_run_id: str, uri: str, digest: str):
    """The trial function with what every trial shares. One worker: it trains itself and holds the worker's
    resources; several: it only drives a Ray Train run (whose workers hold theirs)."""
    from ray import tune

    from dcad.platform.mlflow_store import absolute_uri
    from dcad.platform.sweep.trial import TrialContext, run_trial

    spec, r = plan.spec, plan.spec.resources
    carried = [m for m, _ in spec.objectives]  # metrics every result must hold: the searcher's and ASHA's
    if spec.asha_metric and spec.asha_metric[0] not in carried:
        carried.append(spec.asha_metric[0])
    context = TrialContext(
        sweep=spec.name, base_cfg=spec.base_config().model_dump(mode="json"), data_root=str(spec.dataset_path()),
        storage=plan.where.root, workers=r.workers, cpus_per_worker=r.cpus_per_worker, gpus_per_worker=r.gpus_per_worker,
        carried=tuple(carried), tracking_uri=absolute_uri(uri),
        experiment=spec.experiment, parent_run_id=parent_run_id, dataset_digest=digest, address=plan.address)
    resources = {"CPU": r.cpus_per_worker, "GPU": r.gpus_per_worker} if r.workers == 1 else {"CPU": TRIAL_CPUS}
    return tune.with_resources(tune.with_parameters(run_trial, context=context), resources)


def _fit(plan: SweepPlan, state: SweepState, parent_run_id: str, uri: str, digest: str, concurrency: int, log: Log):
    """Start or restore the Tune experiment and run it; (the trials, whether it was interrupted)."""
    from ray import tune

    from dcad.platform.sweep.cleanup import PlacementGroupJanitor
    from dcad.platform.sweep.progress import SweepProgress
    from dcad.platform.sweep.search import build_scheduler, build_searcher

    spec, where = plan.spec, plan.where
    trainable = _trainable(plan, parent_run_id, uri, digest)
    experiment, fs = where.path(TUNE_DIR), where.storage.filesystem
    if plan.resume and tune.Tuner.can_restore(experiment, storage_filesystem=fs):
        log(f"resuming sweep '{spec.name}' from {where.describe()}/{TUNE_DIR}")
        try:
            tuner = tune.Tuner.restore(experiment, trainable=trainable, resume_unfinished=True, resume_errored=True,
                                       restart_errored=False, storage_filesystem=fs)
        except ModuleNotFoundError as err:  # the experiment pickled a class this version of dcad no longer has
            raise SweepError(f"sweep '{spec.name}' was saved by an earlier dcad version ({err.name} is gone): it "
                             "cannot be resumed; run it again under a new name") from None
    else:
        if plan.resume:
            log(f"no Tune experiment in {where.describe()}/{TUNE_DIR} yet: starting the trials afresh")
        tune_config = tune.TuneConfig(
            search_alg=build_searcher(spec, state.study_storage), scheduler=build_scheduler(spec),
            num_samples=spec.num_trials, max_concurrent_trials=concurrency, time_budget_s=spec.time_budget_s,
            reuse_actors=True,  # the next trial skips a process start and its imports (torch, timm, MLflow)
            trial_dirname_creator=lambda trial: f"trial_{trial.trial_id}")
        run_config = tune.RunConfig(
            name=TUNE_DIR, storage_path=where.path(), storage_filesystem=fs, verbose=0,
            callbacks=[SweepProgress(spec.num_trials, spec.primary.metric, spec.primary.mode), PlacementGroupJanitor()],
            failure_config=tune.FailureConfig(max_failures=0), checkpoint_config=tune.CheckpointConfig(num_to_keep=2))
        tuner = tune.Tuner(trainable, tune_config=tune_config, run_config=run_config)
    # the classic reporter (silent at verbose=0): the progress lines are the report
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    # re-scoring trials end within seconds, so Tune snapshots the experiment often (what makes --resume exact)
    # and would warn each time
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    with graceful_interrupt() as interrupted:
        results = tuner.fit()
    return list(results), bool(interrupted)


@contextmanager
def graceful_interrupt() -> Iterator[list[bool]]:
    """Ctrl-C during `tuner.fit()`: noted (the yielded list), then sent to Tune as the SIGUSR1 of its graceful stop
    (Tune's own SIGINT handler is off: after it, a stopped trial looks finished); a second one raises at once."""
    seen: list[bool] = []

    def on_sigint(signum, frame) -> None:
        if seen:
            raise KeyboardInterrupt
        seen.append(True)
        os.kill(os.getpid(), signal.SIGUSR1)

    env = os.environ.get(NO_TUNE_SIGINT)
    os.environ[NO_TUNE_SIGINT] = "1"
    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        yield seen
    finally:
        signal.signal(signal.SIGINT, previous or signal.default_int_handler)
        if env is None:
            os.environ.pop(NO_TUNE_SIGINT, None)
        else:
            os.environ[NO_TUNE_SIGINT] = env


def _record(plan: SweepPlan, state: SweepState, parent, trials: list, interrupted: bool, uri: str, wall: float,
            log: Log) -> SweepResult:
    """The sweep's result, recorded on its parent run; the best trial registered unless interrupted or too weak."""
    spec = plan.spec
    records = [reporting.trial_record(t, spec, interrupted) for t in trials]
    reporting.mark_stopped_children(parent.client, records)
    call_when_reachable(lambda: reporting.end_orphaned_trials(parent, log), "ending orphaned trial runs")
    best = reporting.best_trial(records, spec)
    result = SweepResult(spec.name, parent.run_id, best, None, records, interrupted=interrupted, wall_seconds=wall,
                         storage=plan.where.describe(), study_storage=state.study_storage)
    if spec.multi_objective:
        result.pareto = [r.trial_id for r in reporting.pareto_front(records, spec)]
    reporting.record_outcome(parent, result)
    if interrupted:
        ended = sum(r.status in ("finished", "stopped", "failed") for r in records)
        log(f"sweep interrupted after {ended}/{spec.num_trials} trials; continue it with: dcad sweep SPEC --resume")
        parent.finish("KILLED")
        return result
    reporting.log_study_plots(parent, state.study_storage, spec, log)
    if spec.register_best and best is not None and best.run_id:
        low = reporting.below_register_floor(records, best, spec)
        if low:
            log(f"not registered as {spec.register_best}: the best trial's {low} (register_floor "
                f"{spec.register_floor:g}); train longer or widen the search")
            parent.set_tags({"dcad.registration": f"refused: {low}"})
        else:
            result.registered_version = call_when_reachable(
                lambda: reporting.register_best(parent.client, spec, best, spec.dataset_path(), uri, log),
                "registering the best trial")
            log(f"registered the best trial's model as {spec.register_best} version {result.registered_version} @challenger")
    parent.finish("FINISHED")
    return result
