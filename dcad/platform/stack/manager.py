"""`up`, `status` and `down` of the local stack: MLflow (PostgreSQL or sqlite backend, artifacts proxied to S3),
an S3 endpoint (moto_server) and a Ray head, all on loopback, recorded in `.dcad/stack/stack.json`."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Literal

from dcad.platform.errors import describe
from dcad.platform.secrets import redact
from dcad.platform.stack import postgres, s3_data
from dcad.platform.stack.errors import StackError
from dcad.platform.stack.procs import identify, listening, matches, port_in_use, stop
from dcad.platform.stack.services import (
    create_bucket, launch, mlflow_launch, postgres_launch, ray_launch, s3_credentials, s3_launch, start, wait_ready,
)
from dcad.platform.stack.state import ServiceRecord, StackState

Log = Callable[[str], None]
Backend = Literal["auto", "postgres", "sqlite"]
STOP_SIGNALS = {"postgres": 2}  # SIGINT: PostgreSQL's fast shutdown; the others get SIGTERM


@dataclass
class StackOptions:
    state_dir: Path
    host: str = "127.0.0.1"
    mlflow_port: int = 5000
    s3_port: int = 9000
    ray_port: int = 6379
    postgres_port: int = 5433  # 5432 is often the system's own PostgreSQL
    backend: Backend = "auto"
    postgres_uri: str | None = None  # an existing PostgreSQL database instead of starting one
    postgres_bin: Path | None = None
    bucket: str = "dcad-artifacts"
    ray: bool = True
    ray_cpus: int | None = None
    ray_object_store_mb: int = 512
    timeout_s: float = 180.0


@dataclass
class ServiceStatus:
    name: str
    pid: int
    port: int
    alive: bool  # the recorded process (pid, start time, command line) still runs
    listening: bool
    url: str
    details: dict


def default_state_dir() -> Path:
    from dcad.platform.store import dcad_home

    return dcad_home() / "stack"


# ---- up ------------------------------------------------------------------------------------------------
def up(opts: StackOptions, log: Log = print) -> StackState:
    """Start the services in dependency order; on any failure stop the ones already started."""
    _refuse_running(opts.state_dir)
    backend, binaries = choose_backend(opts)
    _check_ports(opts, backend)
    opts.state_dir.mkdir(parents=True, exist_ok=True)
    state = StackState(opts.state_dir / "stack.json", created=datetime.now(timezone.utc).isoformat(timespec="seconds"))
    try:
        _start_all(opts, backend, binaries, state, log)
    except BaseException:
        log("start failed; stopping what was started")
        down(opts.state_dir, log=log)
        raise
    return state


def _start_all(opts: StackOptions, backend: str, binaries, state: StackState, log: Log) -> None:
    """PostgreSQL, S3 and the Ray head start together; MLflow once its database and bucket exist."""
    host = opts.host
    tracking_uri = f"http://{host}:{opts.mlflow_port}"
    pending = _start_independent(opts, backend, binaries, tracking_uri, state)
    if "postgres" in pending:
        record = _ready(pending.pop("postgres"), opts, state)
        postgres.wait_and_create_database(host, opts.postgres_port, lambda: matches(record.process), opts.timeout_s)
        log(f"postgres  pid {record.pid}  {host}:{opts.postgres_port}  (data {record.details['data_dir']})")
    credentials = s3_credentials()
    s3 = _ready(pending.pop("s3"), opts, state)
    create_bucket(s3.url, opts.bucket, credentials)
    s3.details["bucket"] = opts.bucket
    restored = s3_data.restore_bucket(s3.url, opts.bucket, credentials, opts.state_dir)
    kept = f", {restored} object(s) restored from {s3_data.data_dir(opts.state_dir, opts.bucket)}" if restored else ""
    log(f"s3        pid {s3.pid}  {s3.url}  (bucket {opts.bucket}{kept})")
    backend_uri = _backend_uri(opts, backend)
    artifacts = f"s3://{opts.bucket}/mlflow"
    server = launch(mlflow_launch(opts.state_dir, host, opts.mlflow_port, backend_uri, artifacts, s3.url, credentials), opts.timeout_s)
    server.details["backend_kind"] = backend
    state.add(server)
    log(f"mlflow    pid {server.pid}  {server.url}  (backend {redact(backend_uri)}, artifacts {artifacts})")
    state.env = {"MLFLOW_TRACKING_URI": server.url, "MLFLOW_S3_ENDPOINT_URL": s3.url}
    if "ray" in pending:
        head = _ready(pending.pop("ray"), opts, state)
        state.env["RAY_ADDRESS"] = head.url
        log(f"ray       pid {head.pid}  {head.url}")
    state.save()


def _start_independent(opts: StackOptions, backend: str, binaries, tracking_uri: str, state: StackState) -> dict:
    """Spawn the services that need nothing else; each spawned process is recorded at once (so a failure stops it)."""
    makers = [lambda: s3_launch(opts.state_dir, opts.host, opts.s3_port)]
    if opts.ray:
        makers.append(lambda: ray_launch(opts.state_dir, opts.host, opts.ray_port, tracking_uri, opts.ray_cpus, opts.ray_object_store_mb))
    if backend == "postgres":  # last: preparing it runs initdb, while the others already start
        makers.append(lambda: postgres_launch(binaries, opts.state_dir, opts.host, opts.postgres_port))
    pending = {}
    for make in makers:
        item = make()
        proc = start(item)
        state.add(_provisional(item, proc))
        pending[item.name] = (item, proc)
    return pending


def _provisional(item, proc) -> ServiceRecord:
    """What `down` needs before the service is ready: its pid, start time and command line as /proc shows them now."""
    who = identify(proc.pid)
    cmdline = list(who.cmdline) if who else list(item.cmd)
    return ServiceRecord(item.name, proc.pid, who.start_time if who else 0, cmdline, item.host, item.port, item.url, str(item.log), item.details)


def _ready(pending: tuple, opts: StackOptions, state: StackState) -> ServiceRecord:
    """Wait for a spawned service and replace its provisional record by the final one."""
    item, proc = pending
    record = wait_ready(item, proc, opts.timeout_s)
    state.services = [record if s.name == record.name else s for s in state.services]
    state.save()
    return record


def choose_backend(opts: StackOptions) -> tuple[str, postgres.PostgresBinaries | None]:
    """`external` (--postgres-uri), `postgres` (binaries found), else `sqlite` (unless PostgreSQL was required)."""
    if opts.backend == "sqlite":
        return "sqlite", None
    if opts.postgres_uri:
        return "external", None
    binaries = postgres.find_binaries(opts.postgres_bin)
    if binaries is not None:
        return "postgres", binaries
    if opts.backend == "postgres":
        raise StackError("no PostgreSQL binaries found (apt-get install postgresql, or pass --postgres-bin DIR or --postgres-uri URI)")
    return "sqlite", None


def _backend_uri(opts: StackOptions, backend: str) -> str:
    if backend == "external":
        return postgres.with_driver(opts.postgres_uri or "")
    if backend == "postgres":
        return postgres.backend_uri(opts.host, opts.postgres_port)
    opts.state_dir.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{(opts.state_dir / 'mlflow.db').resolve()}"


def _refuse_running(state_dir: Path) -> None:
    state = StackState.load(state_dir)
    if state is None:
        return
    if any(matches(s.process) for s in state.services):
        raise StackError(f"a stack is already running (state {state.path}); see `dcad stack status` or stop it with `dcad stack down`")
    state.remove()  # left over from a stack whose processes are gone


def _check_ports(opts: StackOptions, backend: str) -> None:
    wanted = {"mlflow": opts.mlflow_port, "s3": opts.s3_port}
    if opts.ray:
        wanted["ray"] = opts.ray_port
    if backend == "postgres":
        wanted["postgres"] = opts.postgres_port
    seen: dict[int, str] = {}
    for name, port in wanted.items():
        if port in seen:
            raise StackError(f"port {port} is given to both {seen[port]} and {name} (use --{name}-port)")
        seen[port] = name
        if not 0 < port < 65536:
            raise StackError(f"--{name}-port {port}: not a TCP port")
        if port_in_use(opts.host, port):
            raise StackError(f"port {port} on {opts.host} ({name}) is already in use; choose another with --{name}-port")


# ---- status and down ---------------------------------------------------------------------------------
def status(state_dir: Path) -> tuple[StackState | None, list[ServiceStatus]]:
    state = StackState.load(state_dir)
    if state is None:
        return None, []
    rows = [ServiceStatus(s.name, s.pid, s.port, matches(s.process), listening(s.host, s.port), s.url, s.details) for s in state.services]
    return state, rows


def down(state_dir: Path, purge: bool = False, log: Log = print) -> list[tuple[str, int, str]]:
    """Stop exactly the recorded processes (each verified by pid, start time and command line), newest first."""
    state = StackState.load(state_dir)
    if state is None:
        if purge:  # a stopped stack: its kept data still goes
            _purge_stopped(state_dir)
        return []
    report = []
    for service in reversed(state.services):
        if service.name == "s3" and not purge and matches(service.process):
            _save_s3(service, state_dir, log)  # after MLflow and Ray stopped: nothing writes any more
        outcome = stop(service.process, STOP_SIGNALS.get(service.name, 15))
        report.append((service.name, service.pid, outcome))
        log(f"{service.name:<9} pid {service.pid}: {outcome}")
        _cleanup(service.details, purge)
    if purge:
        s3_data.purge(state_dir)
    state.remove()
    return report


def _purge_stopped(state_dir: Path) -> None:
    s3_data.purge(state_dir)
    try:
        data_dir = postgres.data_dir_for(state_dir, postgres.run_as_user())
    except StackError:  # root without a `postgres` user: there never was a PostgreSQL data directory
        return
    _cleanup({"data_dir": str(data_dir)}, purge=True)


def _save_s3(service: ServiceRecord, state_dir: Path, log: Log) -> None:
    """The bucket's objects to disk before the in-memory endpoint stops; if that fails, it keeps running."""
    bucket = service.details.get("bucket")
    if not bucket:
        return
    try:
        count = s3_data.save_bucket(service.url, bucket, s3_credentials(), state_dir)
    except Exception as err:  # noqa: BLE001 - reported, and nothing is stopped that would lose data
        raise StackError(f"s3: saving bucket {bucket} to {s3_data.data_dir(state_dir, bucket)} failed ({describe(err)}); "
                         "the S3 endpoint is left running: run dcad stack down again") from None
    log(f"s3        {count} object(s) of bucket {bucket} kept in {s3_data.data_dir(state_dir, bucket)}")


def _cleanup(details: dict, purge: bool) -> None:
    """Ray's temp dir always goes; PostgreSQL's data (the MLflow database) only with `purge`."""
    if details.get("temp_dir"):
        shutil.rmtree(details["temp_dir"], ignore_errors=True)
    if purge and details.get("data_dir"):
        data_dir = Path(details["data_dir"])
        shutil.rmtree(data_dir.parent if data_dir.parent.name.startswith("dcad-pg-") else data_dir, ignore_errors=True)
