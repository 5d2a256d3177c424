"""How a stack service is spawned, recorded and waited for; the S3 endpoint, the MLflow server and the Ray head."""

from __future__ import annotations

import os
import pwd
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import suppress
from pathlib import Path
from typing import Callable

import requests

from dcad.platform.errors import describe
from dcad.platform.secrets import redact
from dcad.platform.stack.procs import ProcessId, free_ports, identify, listening
from dcad.platform.stack.state import ServiceRecord, StackError, StackOptions, StackState
from dcad.platform.storage import CHECKSUM_ENV, DEFAULT_REGION, list_keys, s3_client

Ready = Callable[[], ServiceRecord]  # waits until the service is ready, then gives its record
PART = ".dcad-part"


def start(opts: StackOptions, state: StackState, name: str, cmd: list[str], env: dict[str, str], port: int, url: str,
          probe: Callable[[], bool], details: dict, user: str | None = None, cwd: Path | None = None) -> Ready:
    """Spawn a service (output to STATE_DIR/NAME.log) and record it at once, so `down` stops it even if it never gets ready."""
    log = opts.state_dir / f"{name}.log"
    with log.open("ab") as fh:  # its own session: it outlives this process
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, cwd=cwd, start_new_session=True,
                                user=user, group=user and pwd.getpwnam(user).pw_gid, extra_groups=[] if user else None)
    while (who := identify(proc.pid)) is None and proc.poll() is None:  # right after exec, /proc may not show the command line yet
        time.sleep(0.01)
    who = who or ProcessId(proc.pid, 0, tuple(cmd))
    record = ServiceRecord(name, who.pid, who.start_time, list(who.cmdline), opts.host, port, url, str(log), details)
    state.add(record)

    def ready() -> ServiceRecord:
        deadline = time.monotonic() + opts.timeout_s
        while proc.poll() is None:
            with suppress(Exception):  # not ready yet (connection refused, half-started server)
                if probe():
                    return record
            if time.monotonic() > deadline:
                raise StackError(f"{name} was not ready on port {port} after {opts.timeout_s:.0f} s (log {log})")
            time.sleep(0.3)
        lines = log.read_text(errors="replace").strip().splitlines()
        last = redact(lines[-1])[:300] if lines else "no output"
        raise StackError(f"{name} exited with code {proc.returncode} while starting: {last} (log {log})")

    return ready


def clean_env(*drop: str) -> dict[str, str]:
    """This process's environment without credentials and client settings the services must not inherit."""
    return {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "MLFLOW_", "RAY_ADDRESS", *drop))}


def _executable(name: str) -> str:
    """A console script of this environment (next to the interpreter), else from PATH."""
    found = shutil.which(name, path=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))
    if not found:
        raise StackError(f"'{name}' is not installed in this environment (pip install 'dcad[dev]')")
    return found


def start_s3(opts: StackOptions, state: StackState) -> Ready:
    url = f"http://{opts.host}:{opts.s3_port}"
    return start(opts, state, "s3", [_executable("moto_server"), "-H", opts.host, "-p", str(opts.s3_port)], clean_env(), opts.s3_port, url,
                 lambda: requests.get(url + "/moto-api/", timeout=2).status_code < 500,
                 {"kind": "moto_server (objects kept in STATE_DIR/s3-data across down/up)"})


def bucket_dir(state_dir: Path, bucket: str) -> Path:
    return state_dir / "s3-data" / bucket


def _s3(endpoint: str):
    return s3_client(endpoint, aws_access_key_id="dcadstack", aws_secret_access_key="moto-accepts-any-key", region_name=DEFAULT_REGION)


def restore_bucket(endpoint: str, bucket: str, state_dir: Path) -> int:
    """Create the bucket in the new endpoint and upload the saved copy into it; returns the number of objects restored."""
    client, root = _s3(endpoint), bucket_dir(state_dir, bucket)
    client.create_bucket(Bucket=bucket)
    files = sorted(p for p in root.rglob("*") if p.is_file() and not p.name.endswith(PART))
    for path in files:
        client.upload_file(str(path), bucket, path.relative_to(root).as_posix())
    return len(files)


def save_bucket(endpoint: str, bucket: str, state_dir: Path, log: Callable[[str], None]) -> None:
    """Mirror the bucket into STATE_DIR/s3-data, each file renamed into place (an interrupted save keeps the old copy)."""
    client, root = _s3(endpoint), bucket_dir(state_dir, bucket)
    try:
        keys = list_keys(client, bucket)
        for key in keys:
            target = root / key
            target.parent.mkdir(parents=True, exist_ok=True)
            client.download_file(bucket, key, str(target) + PART)
            os.replace(str(target) + PART, target)
        wanted = {root / key for key in keys}
        for path in [p for p in root.rglob("*") if p.is_file() and p not in wanted]:
            path.unlink()
    except Exception as err:  # noqa: BLE001 - reported, and nothing is stopped that would lose data
        raise StackError(f"s3: saving bucket {bucket} to {root} failed ({describe(err)}); "
                         "the S3 endpoint is left running: run dcad stack down again") from None
    log(f"s3        {len(keys)} object(s) of bucket {bucket} kept in {root}")


def start_mlflow(opts: StackOptions, state: StackState, backend_uri: str, backend_kind: str, s3_endpoint: str) -> Ready:
    """Artifacts proxied to s3://BUCKET/mlflow; the backend URI travels in the environment, so no password shows in `ps`."""
    host, port, artifacts = opts.host, opts.mlflow_port, f"s3://{opts.bucket}/mlflow"
    url = f"http://{host}:{port}"
    cmd = [sys.executable, "-m", "mlflow", "server", "--host", host, "--port", str(port), "--workers", "1", "--serve-artifacts",
           "--artifacts-destination", artifacts, "--allowed-hosts", f"{host}:{port},localhost:{port},{host},localhost"]
    # throw-away S3 keys (moto accepts any), only in the server's environment, never stored
    keys = {"AWS_ACCESS_KEY_ID": "dcadstack" + secrets.token_hex(6), "AWS_SECRET_ACCESS_KEY": secrets.token_urlsafe(30)}
    env = {**clean_env(), **CHECKSUM_ENV, **keys, "AWS_DEFAULT_REGION": DEFAULT_REGION, "MLFLOW_BACKEND_STORE_URI": backend_uri,
           "MLFLOW_S3_ENDPOINT_URL": s3_endpoint, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    return start(opts, state, "mlflow", cmd, env, port, url, lambda: requests.get(url + "/health", timeout=2).status_code < 500,
                 {"backend": redact(backend_uri), "artifacts_destination": artifacts, "backend_kind": backend_kind})


def start_ray(opts: StackOptions, state: StackState) -> Ready:
    """`ray start --head --block` with free auxiliary ports (8265 may be another head's) and a short private temp dir."""
    host, port, log = opts.host, opts.ray_port, opts.state_dir / "ray.log"
    temp_dir = tempfile.mkdtemp(prefix="dcad-stack-ray-", dir="/tmp")  # short: Ray's unix socket paths are limited
    ports = ("--node-manager-port", "--object-manager-port", "--dashboard-agent-listen-port", "--dashboard-agent-grpc-port",
             "--metrics-export-port", "--runtime-env-agent-port", "--dashboard-port")
    cmd = [_executable("ray"), "start", "--head", "--block", "--disable-usage-stats", "--node-ip-address", host, "--port", str(port),
           "--temp-dir", temp_dir, "--include-dashboard", "false", "--object-store-memory", str(512 * 2**20),
           *(item for name, port in zip(ports, free_ports(len(ports), host)) for item in (name, str(port)))]
    if opts.ray_cpus is not None:
        cmd += ["--num-cpus", str(opts.ray_cpus)]
    offset = log.stat().st_size if log.exists() else 0

    def started() -> bool:
        with log.open("rb") as fh:
            fh.seek(offset)
            return b"Ray runtime started" in fh.read() and listening(host, port)

    env = {**clean_env(), "RAY_USAGE_STATS_ENABLED": "0", "MLFLOW_TRACKING_URI": f"http://{host}:{opts.mlflow_port}"}
    return start(opts, state, "ray", cmd, env, port, f"{host}:{port}", started, {"temp_dir": temp_dir})
