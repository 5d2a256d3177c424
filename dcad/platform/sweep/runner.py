"""`run_sweep`: plan, start or resume the Tune experiment, then record the outcome.

A sweep is one Tune experiment (`STORAGE/NAME/tune`) of `num_trials` function trials driven by a
searcher on a persistent Optuna study and, optionally, ASHA. Before Ray starts the runner checks what
can be checked cheaply (spec, dataset, storage, tracking store, the state of an earlier run under the
same name); after Ray is up it checks that one trial fits the cluster and lowers the concurrency to
what fits. When no swept key changes the base branch it is trained once, before the trials
(`stages.train_shared_base`). `--resume` restores the experiment (`Tuner.restore`): finished trials are
kept, unfinished ones restart with the same trial id from their last checkpoint, the searcher (with
its Optuna study) is restored, and the MLflow parent run recorded in the sweep state is reopened.
Ctrl-C stops the trials gracefully (Tune saves the experiment) and the sweep ends resumable.
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass
from typing import Callable

from dcad.platform.sweep import reporting
from dcad.platform.sweep.reporting import SweepResult
from dcad.platform.sweep.search import build_scheduler, build_searcher, open_study, study_url
from dcad.platform.sweep.spec import TRIAL_CPUS, SweepSpec
from dcad.platform.sweep.state import TUNE_DIR, SPEC_FILE, SweepDir, SweepError, SweepState, now_utc, spec_digest, sweep_dir
from dcad.platform.tracking_buffer import call_when_reachable

Log = Callable[[str], None]


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
        s, r = self.spec, self.spec.resources
        gpu = f", {r.gpus_per_worker:g} GPU" if r.gpus_per_worker else ""
        per_trial = (f"{r.cpus_per_worker:g} CPU{gpu}, training in the trial itself" if r.workers == 1 else
                     f"a Ray Train run of {r.workers} workers × ({r.cpus_per_worker:g} CPU{gpu}) + {TRIAL_CPUS:g} CPU for the trial")
        es = s.early_stopping
        stopping = (f"ASHA on {s.asha_metric[0]} ({s.asha_metric[1]}), grace {es.grace_period}, max_t {es.max_t} epochs, "
                    f"reduction {es.reduction_factor:g}") if es else "none"
        from dcad.platform.sweep.stages import StagePlan

        lines = [self.note] if self.note else []
        lines += [
            f"sweep '{s.name}' ({'resume' if self.resume else 'new'}): {s.num_trials} trials, at most {s.max_concurrent} at a time",
            f"base: {s.base.profile or s.base.config} with {len(s.base.overrides)} override(s); {self.total_epochs} epochs per trial",
            f"dataset: {s.dataset_path()}",
            f"objective: {', '.join(f'{o.metric} ({o.mode})' for o in s.objective)}; sampler {s.sampler.type} (seed {s.sampler.seed})",
            f"early stopping: {stopping}",
            *StagePlan.of(s).lines(),
            f"resources per trial: {per_trial}; cluster: {self.address or 'a local Ray instance'}",
            f"time budget: {f'{s.time_budget_s:g} s' if s.time_budget_s else 'none'}",
            f"storage: {self.where.describe()}; Optuna study '{s.name}' in {self.study_storage}",
            f"tracking: {self.tracking_uri or 'default store'}, experiment '{s.experiment}'"
            + (f"; best model registered as '{s.register_best}' @challenger"
               + (f" if its val image and pixel AUROC reach {s.register_floor:g}" if s.register_floor else "")
               if s.register_best else ""),
            "search space:",
        ]
        for key, p in s.search_space.items():
            when = f" when {p.when}" if p.when else ""
            rng = f"{p.choices}" if p.type == "categorical" else f"[{p.low}, {p.high}]{' log' if p.log else ''}"
            lines.append(f"  {key}: {p.type} {rng}{when}")
        return lines


def plan_sweep(
    spec: SweepSpec,
    *,
    resume: bool = False,
    address: str | None = None,
    tracking_uri: str | None = None,
    storage: str | None = None,
) -> SweepPlan:
    """Check the spec's data, storage and the earlier state; nothing is started or written."""
    from dcad.platform.ray_worker import total_epochs

    if not spec.dataset_path().is_dir():
        raise SweepError(f"dataset {spec.dataset_path()}: no such directory (create it with: dcad data synth {spec.dataset})")
    runs = series_runs(spec, storage)
    note = None
    if resume:
        if not runs:
            where = sweep_dir(spec, storage)
            raise SweepError(f"nothing to resume: no sweep '{spec.name}' in {where.describe()} (run it without --resume)")
        spec, where, state = runs[-1]
    elif runs:
        latest = runs[-1][0].name
        spec = numbered(spec, len(runs) + 1)
        where, state = sweep_dir(spec, storage), None
        note = (f"sweep '{latest}' has run before: this is a new sweep '{spec.name}' "
                f"(dcad sweep SPEC --resume continues '{latest}' instead)")
    else:
        where, state = sweep_dir(spec, storage), None
    if state is not None and state.spec_digest != spec_digest(spec):
        raise SweepError(f"sweep '{spec.name}' in {where.describe()} was started from a different spec "
                         "(search space, objectives, base or trial count changed); use a new name")
    uri = choose_tracking_uri(spec, state, tracking_uri)
    study = state.study_storage if state else study_url(spec, where.local_dir)
    return SweepPlan(spec, where, state, resume, uri, address, study, total_epochs(spec.base_config()), note)


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
    """The MLflow store of the sweep (None: the embedded default, resolved when it runs).

    A resumed sweep keeps the store its parent run lives in, whatever the environment says; a
    `--tracking-uri` naming another store is refused. A new sweep: `--tracking-uri`, else
    `MLFLOW_TRACKING_URI`, else the spec's `tracking_uri`."""
    from dcad.platform.secrets import redact
    from dcad.platform.store import requested_tracking_uri

    if state is not None and state.tracking_uri:
        if explicit and explicit != state.tracking_uri:
            raise SweepError(f"--tracking-uri {redact(explicit)}: sweep '{spec.name}' logs to "
                             f"{redact(state.tracking_uri)}; a resumed sweep keeps its store (drop --tracking-uri)")
        return state.tracking_uri
    return requested_tracking_uri(explicit, spec.tracking_uri)


def run_sweep(
    spec: SweepSpec,
    *,
    resume: bool = False,
    address: str | None = None,
    tracking_uri: str | None = None,
    storage: str | None = None,
    log: Log = print,
) -> SweepResult:
    """Run (or, with `resume`, continue) the sweep; returns its trials, best trial and registered version."""
    from dcad.platform.sweep import progress

    plan = plan_sweep(spec, resume=resume, address=address, tracking_uri=tracking_uri, storage=storage)
    handler = progress.attach(log)
    try:
        return _run(plan, log)
    finally:
        progress.detach(handler)


def _run(plan: SweepPlan, log: Log) -> SweepResult:
    from dcad.core.data import open_dataset
    from dcad.platform.ray_cluster import connect
    from dcad.platform.storage import check_writable
    from dcad.platform.store import resolve_tracking_uri

    spec, where = plan.spec, plan.where
    check_writable(where.storage)
    uri = resolve_tracking_uri(plan.tracking_uri)
    digest = open_dataset(spec.dataset_path()).digest()
    cluster = connect(plan.address)
    concurrency = fit_concurrency(spec, cluster, log)  # before anything is written: a misfit leaves no state
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
        stage_seconds = _train_shared_stages(plan, digest, concurrency, log)
        trials, interrupted = _fit(plan, state, parent.run_id, uri, digest, concurrency, log)
    except KeyboardInterrupt:
        parent.finish("KILLED")
        raise
    except BaseException:
        parent.finish("FAILED")
        raise
    result = _record(plan, state, parent, trials, interrupted, uri, time.time() - started, log)
    result.stage_seconds = stage_seconds
    return result


def _train_shared_stages(plan: SweepPlan, digest: str, concurrency: int, log: Log) -> dict[str, list[float]]:
    """The stages every trial shares, trained before the trials start; their wall-clock spans."""
    from dcad.platform.sweep.stages import StagePlan, train_shared_base

    if not StagePlan.of(plan.spec).shared_base:
        return {}
    span = train_shared_base(plan.spec, plan.where.root, digest, concurrency, log)
    return {"shared_base": span} if span else {}


def fit_concurrency(spec: SweepSpec, where: str, log: Log) -> int:
    """ClusterError if one trial cannot fit; the number of concurrent trials that fit (at most max_concurrent)."""
    from dcad.platform.ray_cluster import ClusterError, WorkerShape, check_capacity, cluster_nodes

    r = spec.resources
    shape = WorkerShape(r.cpus_per_worker, r.gpus_per_worker)
    nodes = cluster_nodes()
    try:
        check_capacity(r.workers, shape, nodes, where)
    except ClusterError as err:
        hint = "lower resources.workers, resources.cpus_per_worker or resources.gpus_per_worker in the sweep spec"
        raise ClusterError(f"one trial needs {str(err).split('; lower')[0]}; {hint}") from None
    fits = 1
    for n in range(spec.max_concurrent, 1, -1):
        try:
            check_capacity(n * r.workers, shape, nodes, where)
        except ClusterError:
            continue
        fits = n
        break
    if fits < spec.max_concurrent:
        log(f"max_concurrent {spec.max_concurrent} lowered to {fits}: {where} holds {fits} trial(s) of "
            f"{shape.describe(r.workers)} at a time")
    return fits


def _context(plan: SweepPlan, parent_run_id: str, uri: str, digest: str):
    from dcad.platform.store import absolute_uri
    from dcad.platform.sweep.trial import TrialContext

    spec = plan.spec
    carried = [o.metric for o in spec.objective]
    if spec.asha_metric and spec.asha_metric[0] not in carried:
        carried.append(spec.asha_metric[0])
    return TrialContext(
        sweep=spec.name,
        base_cfg=spec.base_config().model_dump(mode="json"),
        data_root=str(spec.dataset_path()),
        storage=plan.where.root,
        workers=spec.resources.workers,
        cpus_per_worker=spec.resources.cpus_per_worker,
        gpus_per_worker=spec.resources.gpus_per_worker,
        objectives=tuple(o.metric for o in spec.objective),
        carried=tuple(carried),
        tracking_uri=absolute_uri(uri),
        experiment=spec.experiment,
        parent_run_id=parent_run_id,
        dataset_digest=digest,
        address=plan.address,
    )


def trial_dirname(trial) -> str:
    return f"trial_{trial.trial_id}"


def _trainable(context):
    """One worker: the trial function trains itself and holds the worker's resources. Several: it only drives
    a Ray Train run (whose workers hold theirs)."""
    from ray import tune

    from dcad.platform.sweep.trial import run_trial

    resources = {"CPU": TRIAL_CPUS}
    if context.workers == 1:
        resources = {"CPU": context.cpus_per_worker, "GPU": context.gpus_per_worker}
    return tune.with_resources(tune.with_parameters(run_trial, context=context), resources)


def _fit(plan: SweepPlan, state: SweepState, parent_run_id: str, uri: str, digest: str, concurrency: int, log: Log):
    """Start or restore the Tune experiment and run it; (the trials, whether it was interrupted)."""
    from ray import tune

    spec, where = plan.spec, plan.where
    trainable = _trainable(_context(plan, parent_run_id, uri, digest))
    experiment, fs = where.path(TUNE_DIR), where.storage.filesystem
    if plan.resume and tune.Tuner.can_restore(experiment, storage_filesystem=fs):
        log(f"resuming sweep '{spec.name}' from {where.describe()}/{TUNE_DIR}")
        tuner = tune.Tuner.restore(experiment, trainable=trainable, resume_unfinished=True, resume_errored=True,
                                   restart_errored=False, storage_filesystem=fs)
    else:
        if plan.resume:
            log(f"no Tune experiment in {where.describe()}/{TUNE_DIR} yet: starting the trials afresh")
        tuner = _new_tuner(plan, trainable, state, concurrency)
    # Tune's newer console output prints its own experiment box and paths whatever `verbose` says; with the
    # classic reporter `verbose=0` is silent, and the sweep's progress lines are the report.
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    # Re-scoring trials end within seconds, so Tune snapshots the experiment often (that is what makes
    # `--resume` exact) and warns about it each time; the warning is not for the user.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    with InterruptWatch() as watch:
        results = tuner.fit()
    return list(results), watch.interrupted


class InterruptWatch:
    """Ctrl-C (SIGINT) during `tuner.fit()`: noted, then handed to Tune as its graceful stop.

    Tune stops the running trials, saves the experiment and returns normally on SIGUSR1 (and on SIGINT,
    unless `TUNE_DISABLE_SIGINT_HANDLER=1`), after which a stopped trial is not told apart from a finished
    one. So Tune's SIGINT handler is turned off, this one notes the interruption and sends the process the
    SIGUSR1 Tune listens for; a second Ctrl-C raises KeyboardInterrupt at once."""

    def __init__(self) -> None:
        self.interrupted = False
        self._previous = None
        self._env = None

    def __enter__(self) -> "InterruptWatch":
        self._env = os.environ.get("TUNE_DISABLE_SIGINT_HANDLER")
        os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"
        self._previous = signal.signal(signal.SIGINT, self._on_sigint)
        return self

    def __exit__(self, *exc) -> None:
        signal.signal(signal.SIGINT, self._previous or signal.default_int_handler)
        if self._env is None:
            os.environ.pop("TUNE_DISABLE_SIGINT_HANDLER", None)
        else:
            os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = self._env

    def _on_sigint(self, signum, frame) -> None:
        if self.interrupted:
            raise KeyboardInterrupt
        self.interrupted = True
        os.kill(os.getpid(), signal.SIGUSR1)


def _new_tuner(plan: SweepPlan, trainable, state: SweepState, concurrency: int):
    from ray import tune

    from dcad.platform.sweep import progress
    from dcad.platform.sweep.cleanup import PlacementGroupJanitor

    spec, where = plan.spec, plan.where
    scheduler = build_scheduler(spec)
    tune_config = tune.TuneConfig(
        search_alg=build_searcher(spec, state.study_storage),
        scheduler=scheduler,
        num_samples=spec.num_trials,
        max_concurrent_trials=concurrency,
        time_budget_s=spec.time_budget_s,
        reuse_actors=True,  # the next trial skips a process start and its imports (torch, timm, MLflow)
        trial_dirname_creator=trial_dirname,
    )
    run_config = tune.RunConfig(
        name=TUNE_DIR,
        storage_path=where.path(),
        storage_filesystem=where.storage.filesystem,
        verbose=0,
        callbacks=[progress.SweepProgress(spec.num_trials, spec.primary.metric, spec.primary.mode), PlacementGroupJanitor()],
        failure_config=tune.FailureConfig(max_failures=0),
        checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
    )
    return tune.Tuner(trainable, tune_config=tune_config, run_config=run_config)


def _record(plan: SweepPlan, state: SweepState, parent, trials: list, interrupted: bool, uri: str, wall: float,
            log: Log) -> SweepResult:
    spec = plan.spec
    records = [reporting.trial_record(t, spec, interrupted) for t in trials]
    ended = sum(r.status in ("finished", "stopped", "failed") for r in records)
    reporting.mark_stopped_children(parent.client, records)
    call_when_reachable(lambda: reporting.end_orphaned_trials(parent, log), "ending orphaned trial runs")
    result = SweepResult(spec.name, parent.run_id, reporting.best_trial(records, spec), None, records,
                         interrupted=interrupted, wall_seconds=wall, storage=plan.where.describe(),
                         study_storage=state.study_storage)
    if spec.multi_objective:
        result.pareto = [r.trial_id for r in reporting.pareto_front(records, spec)]
    reporting.record_outcome(parent, result, spec)
    study = open_study(spec, state.study_storage)
    if study is not None and not interrupted:
        reporting.log_study_plots(parent, study, spec, log)
    if interrupted:
        log(f"sweep interrupted after {ended}/{spec.num_trials} trials; continue it with: dcad sweep SPEC --resume")
        parent.finish("KILLED")
        return result
    if spec.register_best and result.best_trial is not None and result.best_trial.run_id:
        low = reporting.below_register_floor(records, result.best_trial, spec)
        if low:
            log(f"not registered as {spec.register_best}: the best trial's {low} (register_floor "
                f"{spec.register_floor:g}); train longer or widen the search")
            parent.set_tags({"dcad.registration": f"refused: {low}"})
        else:
            result.registered_version = call_when_reachable(
                lambda: reporting.register_best(parent.client, spec, result.best_trial, spec.dataset_path(), uri, log),
                "registering the best trial")
            log(f"registered the best trial's model as {spec.register_best} version {result.registered_version} @challenger")
    parent.finish("FINISHED")
    return result
