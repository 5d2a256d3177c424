"""PostgreSQL for the MLflow backend from the installed binaries: `initdb` once (trust auth, role `dcad`), then `postgres`."""

from __future__ import annotations

import glob
import hashlib
import os
import pwd
import re
import shutil
import subprocess
from contextlib import closing, suppress
from pathlib import Path

from dcad.platform.stack.services import Ready, clean_env, start
from dcad.platform.stack.state import StackError, StackOptions, StackState

ROLE, DATABASE = "dcad", "mlflow"


def find_binaries(explicit: Path | None = None) -> Path | None:
    """The directory with initdb and postgres: `explicit`, else that of initdb on PATH, else the newest installed one."""
    on_path = shutil.which("initdb")
    installed = sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True, key=lambda p: [int(v) for v in re.findall(r"\d+", p)])
    for directory in [str(explicit)] if explicit else [os.path.dirname(os.path.realpath(on_path)) if on_path else "", *installed]:
        if directory and all(shutil.which(name, path=directory) for name in ("initdb", "postgres")):
            return Path(directory)
    if explicit:
        raise StackError(f"--postgres-bin {explicit}: no initdb and postgres programs there")
    return None


def run_as_user() -> str | None:
    """The user the server runs as: None (this one), or `postgres` when this is root (PostgreSQL refuses root)."""
    if os.geteuid() != 0:
        return None
    with suppress(KeyError):
        return pwd.getpwnam("postgres").pw_name
    raise StackError("PostgreSQL cannot run as root and there is no 'postgres' user; use --backend sqlite or --postgres-uri")


def data_dir_for(state_dir: Path, user: str | None) -> Path:
    """STATE_DIR/postgres, or for the `postgres` user (who may not reach STATE_DIR) /var/tmp/dcad-pg-HASH/data."""
    if user is None:
        return state_dir / "postgres"
    return Path("/var/tmp") / f"dcad-pg-{hashlib.sha256(str(state_dir.resolve()).encode()).hexdigest()[:12]}" / "data"


def _init_cluster(bin_dir: Path, data_dir: Path, user: str | None, log: Path) -> None:
    """`initdb` unless the directory already holds a cluster (then the earlier stack's runs are kept)."""
    if (data_dir / "PG_VERSION").is_file():
        return
    data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    if user is not None:
        for path in (data_dir.parent, data_dir):
            shutil.chown(path, user, pwd.getpwnam(user).pw_gid)
    cmd = [str(bin_dir / "initdb"), "-D", str(data_dir), "-U", ROLE, "--auth=trust", "-E", "UTF8", "--locale=C", "--no-instructions"]
    with log.open("ab") as fh:
        done = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, user=user, cwd="/", timeout=120)
    if done.returncode != 0:
        raise StackError(f"initdb failed with exit code {done.returncode} (see {log})")


def _create_database(host: str, port: int) -> bool:
    """Connect (raises until the server accepts connections) and create the MLflow database if it is missing."""
    import psycopg2

    with closing(psycopg2.connect(host=host, port=port, user=ROLE, dbname="postgres", connect_timeout=2)) as conn:
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (DATABASE,))
            if cur.fetchone() is None:
                cur.execute(f'CREATE DATABASE "{DATABASE}"')
    return True


def start_postgres(opts: StackOptions, state: StackState, bin_dir: Path) -> Ready:
    """Ready once it accepts connections and the MLflow database exists. TCP only: a Unix socket's path is limited
    to 107 bytes, which a deep state directory exceeds."""
    import psycopg2  # noqa: F401 - the driver of the probe and of the MLflow server: if missing, fail now

    host, port, user = opts.host, opts.postgres_port, run_as_user()
    data_dir = data_dir_for(opts.state_dir, user)
    _init_cluster(bin_dir, data_dir, user, opts.state_dir / "postgres.log")
    cmd = [str(bin_dir / "postgres"), "-D", str(data_dir), "-p", str(port), "-c", f"listen_addresses={host}", "-c", "unix_socket_directories="]
    return start(opts, state, "postgres", cmd, clean_env("PG"), port, backend_uri(host, port), lambda: _create_database(host, port),
                 {"data_dir": str(data_dir), "run_as": user or "", "bin_dir": str(bin_dir)}, user, cwd=data_dir)


def backend_uri(host: str, port: int) -> str:
    """No password: trust authentication on loopback (a developer stack, not a deployment)."""
    return f"postgresql+psycopg2://{ROLE}@{host}:{port}/{DATABASE}"


def with_driver(uri: str) -> str:
    """`postgresql://…` → `postgresql+psycopg2://…`: the driver dcad installs (SQLAlchemy 2.1 would pick psycopg 3)."""
    return re.sub(r"^postgres(ql)?://", "postgresql+psycopg2://", uri)
