"""Processes the stack starts: spawn as a session leader, identify by pid + start time + command line, stop.

A pid alone is not an identity (pids are reused), so every record keeps the process's start time (field 22
of /proc/PID/stat) and its command line as /proc shows it; `stop` acts only on a process that still matches
both, and then on what it started: the processes of its session (gcs_server, raylet …) and its descendants that
left the session (PostgreSQL's backends call setsid()).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

PROC = Path("/proc")
_SPAWNED: dict[int, subprocess.Popen] = {}  # children of this process, polled so they do not stay zombies


@dataclass(frozen=True)
class ProcessId:
    pid: int
    start_time: int
    cmdline: tuple[str, ...]


def read_cmdline(pid: int) -> tuple[str, ...] | None:
    try:
        raw = (PROC / str(pid) / "cmdline").read_bytes()
    except OSError:
        return None
    return tuple(part.decode(errors="replace") for part in raw.split(b"\0") if part)


def _stat_fields(pid: int) -> list[str] | None:
    """Fields after the command name of /proc/PID/stat (field 3 is index 0)."""
    try:
        text = (PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    return text.rsplit(")", 1)[1].split()


def start_time(pid: int) -> int | None:
    fields = _stat_fields(pid)
    return int(fields[19]) if fields else None


def identify(pid: int) -> ProcessId | None:
    started, cmdline = start_time(pid), read_cmdline(pid)
    if started is None or not cmdline:
        return None
    return ProcessId(pid, started, cmdline)


def matches(record: ProcessId) -> bool:
    """True if `record.pid` is still the process recorded (same start time and command line)."""
    current = identify(record.pid)
    return current is not None and current.start_time == record.start_time and current.cmdline == record.cmdline


def session_members(sid: int, not_before: int) -> list[int]:
    """Live (not zombie) pids in session `sid` started no earlier than `not_before` (a reused sid is left alone)."""
    members = []
    for entry in PROC.iterdir():
        if entry.name.isdigit():
            fields = _stat_fields(int(entry.name))
            if fields and fields[0] != "Z" and int(fields[3]) == sid and int(fields[19]) >= not_before:
                members.append(int(entry.name))
    return members


def descendants(pid: int) -> list[int]:
    """Children, grandchildren … of `pid` (from the parent pids in /proc)."""
    children: dict[int, list[int]] = {}
    for entry in PROC.iterdir():
        if entry.name.isdigit():
            fields = _stat_fields(int(entry.name))
            if fields:
                children.setdefault(int(fields[1]), []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _still_running(pids: list[int], not_before: int) -> set[int]:
    """Those of `pids` alive and started no earlier than `not_before` (not a reused pid)."""
    return {pid for pid in pids if _alive(pid) and (start_time(pid) or 0) >= not_before}


def spawn(cmd: list[str], log: Path, env: dict[str, str], *, user: str | None = None, cwd: Path | None = None) -> subprocess.Popen:
    """Start `cmd` detached in its own session (it outlives this process), output appended to `log`."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as fh:
        proc = subprocess.Popen(
            cmd, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, cwd=cwd,
            start_new_session=True, user=user, group=_group_of(user), extra_groups=[] if user else None,
        )
    _SPAWNED[proc.pid] = proc
    return proc


def _group_of(user: str | None) -> int | None:
    if user is None:
        return None
    import pwd

    return pwd.getpwnam(user).pw_gid


def stop(record: ProcessId, sig: int = signal.SIGTERM, grace_s: float = 15.0) -> str:
    """Stop the recorded process and its session; returns what was done (for the report)."""
    if not matches(record):
        if identify(record.pid) is not None:
            return "not touched: the pid now belongs to another process"
        leftovers = session_members(record.pid, record.start_time)
        _signal_all(leftovers, signal.SIGKILL)
        return f"already stopped{f'; killed {len(leftovers)} leftover process(es)' if leftovers else ''}"
    family = descendants(record.pid)  # before the signal: children that left the session (PostgreSQL's setsid)
    _signal_all([record.pid], sig)
    if not _wait_gone([record.pid], grace_s):
        _signal_all([record.pid], signal.SIGKILL)
    members = sorted(set(session_members(record.pid, record.start_time)) | _still_running(family, record.start_time))
    _signal_all(members, signal.SIGTERM)
    if not _wait_gone(members, 5.0):  # slow to exit (e.g. Ray's agents on a loaded machine): kill what is left
        stragglers = set(session_members(record.pid, record.start_time)) | _still_running(members, record.start_time)
        _signal_all(sorted(stragglers), signal.SIGKILL)
        _wait_gone(sorted(stragglers), 5.0)
    return "stopped"


def _signal_all(pids: list[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists on this host (signal 0; one of another user counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _alive(pid: int) -> bool:
    fields = _stat_fields(pid)
    return fields is not None and fields[0] != "Z"


def _wait_gone(pids: list[int], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        _reap(pids)
        if not any(_alive(pid) for pid in pids):
            return True
        time.sleep(0.1)
    return False


def _reap(pids: list[int]) -> None:
    """Collect those of `pids` that this process spawned and that have exited (when `up` and `down` share a process)."""
    for pid in pids:
        child = _SPAWNED.get(pid)
        if child is not None and child.poll() is not None:
            _SPAWNED.pop(pid, None)


def port_in_use(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


def listening(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]
