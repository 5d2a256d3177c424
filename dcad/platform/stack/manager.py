"""`up`, `status` and `down` of the local stack, recorded in `STATE_DIR/stack.json`."""

from __future__ import annotations

import shutil
import signal
from pathlib import Path
from typing import Callable

from dcad.core.clock import now_utc
from dcad.platform.secrets import redact
from dcad.platform.stack import postgres
from dcad.platform.stack.procs import listening, matches, stop
from dcad.platform.stack.services import bucket_dir, restore_bucket, save_bucket, start_mlflow, start_ray, start_s3
from dcad.platform.stack.state import ServiceRecord, StackError, StackOptions, StackState

Log = Callable[[str], None]


def up(opts: StackOptions, log: Log = print) -> StackState:
    """Start the services in dependency order; on any failure stop the ones already started."""
    state = StackState.load(opts.state_dir)
    if state is not None and any(matches(s.process) for s in state.services):
        raise StackError(f"a stack is already running (state {state.path}); see `dcad stack status` or stop it with `dcad stack down`")
    if state is not None:
        state.remove()  # left over from a stack whose processes are gone
    backend, backend_uri, bin_dir = choose_backend(opts)
    _check_ports(opts, backend)
    opts.state_dir.mkdir(parents=True, exist_ok=True)
    state = StackState(opts.state_dir / "stack.json", created=now_utc())
    try:
        _start_all(opts, backend, backend_uri, bin_dir, state, log)
    except BaseException:
        log("start failed; stopping what was started")
        down(opts.state_dir, log=log)
        raise
    return state


def _start_all(opts: StackOptions, backend: str, backend_uri: str, bin_dir: Path | None, state: StackState, log: Log) -> None:
    """S3, the Ray head and PostgreSQL start together; MLflow once its database and bucket exist."""
    def report(record: ServiceRecord, text: str) -> None:
        log(f"{record.name:<9} pid {record.pid}  {text}")

    s3_ready = start_s3(opts, state)
    ray_ready = start_ray(opts, state) if opts.ray else None
    if bin_dir is not None:  # last: preparing it runs initdb while the others already start
        database = postgres.start_postgres(opts, state, bin_dir)()
        report(database, f"{opts.host}:{opts.postgres_port}  (data {database.details['data_dir']})")
    s3 = s3_ready()
    s3.details["bucket"] = opts.bucket
    restored = restore_bucket(s3.url, opts.bucket, opts.state_dir)
    kept = f", {restored} object(s) restored from {bucket_dir(opts.state_dir, opts.bucket)}" if restored else ""
    report(s3, f"{s3.url}  (bucket {opts.bucket}{kept})")
    server = start_mlflow(opts, state, backend_uri, backend, s3.url)()
    report(server, f"{server.url}  (backend {redact(backend_uri)}, artifacts {server.details['artifacts_destination']})")
    state.env = {"MLFLOW_TRACKING_URI": server.url, "MLFLOW_S3_ENDPOINT_URL": s3.url}
    if ray_ready is not None:
        head = ray_ready()
        state.env["RAY_ADDRESS"] = head.url
        report(head, head.url)
    state.save()


def choose_backend(opts: StackOptions) -> tuple[str, str, Path | None]:
    """`external`, `postgres` (binaries found) or `sqlite`, with the MLflow backend URI and the PostgreSQL binaries to start."""
    if opts.backend != "sqlite" and opts.postgres_uri:
        return "external", postgres.with_driver(opts.postgres_uri), None
    bin_dir = postgres.find_binaries(opts.postgres_bin) if opts.backend != "sqlite" else None
    if bin_dir is not None:
        return "postgres", postgres.backend_uri(opts.host, opts.postgres_port), bin_dir
    if opts.backend == "postgres":
        raise StackError("no PostgreSQL binaries found (apt-get install postgresql, or pass --postgres-bin DIR or --postgres-uri URI)")
    return "sqlite", f"sqlite:///{(opts.state_dir / 'mlflow.db').resolve()}", None


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
        if listening(opts.host, port):
            raise StackError(f"port {port} on {opts.host} ({name}) is already in use; choose another with --{name}-port")


def status(state_dir: Path) -> tuple[StackState | None, list[dict]]:
    """The recorded services, each `alive` (its recorded process still runs) and `listening` or not."""
    state = StackState.load(state_dir)
    return state, [{"service": s.name, "pid": s.pid, "port": s.port, "alive": matches(s.process), "listening": listening(s.host, s.port),
                    "url": s.url} for s in (state.services if state else [])]


def down(state_dir: Path, purge: bool = False, log: Log = print) -> list[tuple[str, int, str]]:
    """Stop exactly the recorded processes (each verified by pid, start time and command line), newest first;
    with `purge` also delete the kept S3 objects and the PostgreSQL data, even of a stack already stopped."""
    state = StackState.load(state_dir)
    report = []
    for service in reversed(state.services if state else []):
        if service.name == "s3" and service.details.get("bucket") and not purge and matches(service.process):
            save_bucket(service.url, service.details["bucket"], state_dir, log)  # MLflow and Ray stopped: nothing writes
        outcome = stop(service.process, signal.SIGINT if service.name == "postgres" else signal.SIGTERM)  # SIGINT: fast shutdown
        report.append((service.name, service.pid, outcome))
        log(f"{service.name:<9} pid {service.pid}: {outcome}")
        if service.details.get("temp_dir"):  # Ray's
            shutil.rmtree(service.details["temp_dir"], ignore_errors=True)
    if purge:  # PostgreSQL's data is in STATE_DIR, or (run as `postgres` under root) in /var/tmp/dcad-pg-HASH
        shared = postgres.data_dir_for(state_dir, "postgres").parent
        for path in (state_dir / "s3-data", postgres.data_dir_for(state_dir, None), shared):
            shutil.rmtree(path, ignore_errors=True)
    if state is not None:
        state.remove()
    return report
