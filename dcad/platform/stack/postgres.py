"""A PostgreSQL server for the MLflow backend, run from the installed binaries (no system service).

`initdb` once into the stack's data directory (trust authentication, loopback only, role `dcad`), then
`postgres -D DATA` in the foreground of its own session. PostgreSQL refuses to run as root: under root the
server runs as the `postgres` system user and its data lives in a directory that user owns.
"""

from __future__ import annotations

import glob
import hashlib
import os
import pwd
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from dcad.platform.stack.errors import StackError

ROLE = "dcad"
DATABASE = "mlflow"
RUN_AS_WHEN_ROOT = "postgres"
PROGRAMS = ("initdb", "postgres")


@dataclass(frozen=True)
class PostgresBinaries:
    bin_dir: Path

    def program(self, name: str) -> str:
        return str(self.bin_dir / name)


def find_binaries(explicit: Path | None = None) -> PostgresBinaries | None:
    """`explicit`, else a directory on PATH with initdb and postgres, else the newest /usr/lib/postgresql/*/bin."""
    candidates = [explicit] if explicit else _candidate_dirs()
    for directory in candidates:
        if directory and all((directory / p).is_file() and os.access(directory / p, os.X_OK) for p in PROGRAMS):
            return PostgresBinaries(directory)
    if explicit:
        raise StackError(f"--postgres-bin {explicit}: no initdb and postgres programs there")
    return None


def _candidate_dirs() -> list[Path]:
    on_path = shutil.which("initdb")
    dirs = [Path(os.path.realpath(on_path)).parent] if on_path else []
    versions = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: _version(Path(p).parent.name), reverse=True)
    return dirs + [Path(p) for p in versions]


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split(".") if part.isdigit())


def run_as_user() -> str | None:
    """The user the server runs as: this one, or `postgres` when this is root (None = this user)."""
    if os.geteuid() != 0:
        return None
    try:
        pwd.getpwnam(RUN_AS_WHEN_ROOT)
    except KeyError:
        raise StackError("PostgreSQL cannot run as root and there is no 'postgres' user; use --backend sqlite or --postgres-uri") from None
    return RUN_AS_WHEN_ROOT


def data_dir_for(state_dir: Path, user: str | None) -> Path:
    """Under the state directory; for root a directory the `postgres` user can reach (/var/tmp/dcad-pg-HASH)."""
    if user is None:
        return state_dir / "postgres"
    digest = hashlib.sha256(str(state_dir.resolve()).encode()).hexdigest()[:12]
    return Path("/var/tmp") / f"dcad-pg-{digest}" / "data"


def init_cluster(binaries: PostgresBinaries, data_dir: Path, user: str | None, log: Path) -> None:
    """`initdb` unless the directory already holds a cluster (then the earlier stack's runs are kept)."""
    if (data_dir / "PG_VERSION").is_file():
        return
    data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    if user is not None:
        entry = pwd.getpwnam(user)
        for path in (data_dir.parent, data_dir):
            os.chown(path, entry.pw_uid, entry.pw_gid)
    cmd = [binaries.program("initdb"), "-D", str(data_dir), "-U", ROLE, "--auth=trust", "-E", "UTF8", "--locale=C", "--no-instructions"]
    with log.open("ab") as fh:
        done = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, user=user, cwd="/", timeout=120)
    if done.returncode != 0:
        raise StackError(f"initdb failed with exit code {done.returncode} (see {log})")


def server_command(binaries: PostgresBinaries, data_dir: Path, host: str, port: int) -> list[str]:
    """TCP on `host` only; no Unix-domain socket (its path limit of 107 bytes breaks in deep state directories)."""
    return [binaries.program("postgres"), "-D", str(data_dir), "-p", str(port), "-c", f"listen_addresses={host}",
            "-c", "unix_socket_directories="]


def wait_and_create_database(host: str, port: int, alive, timeout: float) -> None:
    """Wait until the server accepts connections, then create the MLflow database if it is missing."""
    import psycopg2

    deadline = time.monotonic() + timeout
    while True:
        try:
            conn = psycopg2.connect(host=host, port=port, user=ROLE, dbname="postgres", connect_timeout=2)
            break
        except psycopg2.OperationalError:
            if not alive() or time.monotonic() > deadline:
                raise StackError(f"PostgreSQL on {host}:{port} did not accept connections") from None
            time.sleep(0.3)
    try:
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (DATABASE,))
            if cur.fetchone() is None:
                cur.execute(f'CREATE DATABASE "{DATABASE}"')
    finally:
        conn.close()


def backend_uri(host: str, port: int) -> str:
    """No password: trust authentication on loopback (a developer stack, not a deployment)."""
    return f"postgresql+psycopg2://{ROLE}@{host}:{port}/{DATABASE}"  # SQLAlchemy 2.1 would pick psycopg 3


def with_driver(uri: str) -> str:
    """`postgresql://…` → `postgresql+psycopg2://…` (the driver dcad installs; SQLAlchemy 2.1 would pick psycopg 3)."""
    for prefix in ("postgresql://", "postgres://"):
        if uri.startswith(prefix):
            return "postgresql+psycopg2://" + uri[len(prefix):]
    return uri
