"""Processes and ports of the stack: a process is identified by pid + start time + command line (a pid alone is reused)."""

from __future__ import annotations

import os
import signal
import socket
import time
from contextlib import ExitStack, suppress
from dataclasses import dataclass

import psutil


@dataclass(frozen=True)
class ProcessId:
    pid: int
    start_time: float  # psutil's create_time
    cmdline: tuple[str, ...]


def identify(pid: int) -> ProcessId | None:
    """The live process with this pid; None if there is none or it is a zombie."""
    try:
        proc = psutil.Process(pid)
        cmdline = tuple(proc.cmdline())
        return ProcessId(pid, proc.create_time(), cmdline) if cmdline else None
    except psutil.Error:
        return None


def matches(record: ProcessId) -> bool:
    """Whether `record.pid` still is the recorded process (same start time and command line)."""
    return identify(record.pid) == record


def stop(record: ProcessId, sig: int = signal.SIGTERM, grace_s: float = 15.0) -> str:
    """Stop the recorded process, then its session and descendants; returns what was done (for the report)."""
    if not matches(record):
        if identify(record.pid) is not None:
            return "not touched: the pid now belongs to another process"
        leftovers = _session(record)
        _terminate(lambda: _running(leftovers), signal.SIGKILL, 5.0)
        return f"already stopped{f'; killed {len(leftovers)} leftover process(es)' if leftovers else ''}"
    try:
        leader = psutil.Process(record.pid)
        family = leader.children(recursive=True)  # before the signal: children that left the session (setsid())
    except psutil.NoSuchProcess:
        return "already stopped"
    _terminate(lambda: _running([leader]), sig, grace_s)
    _terminate(lambda: _running({*_session(record), *family}), signal.SIGTERM, 5.0)
    return "stopped"


def _terminate(running, sig: int, grace_s: float) -> None:
    """Send `sig` to the processes `running()` lists, wait up to `grace_s` for them to go, then SIGKILL what is left."""
    for signum, wait_s in ((sig, grace_s), (signal.SIGKILL, 5.0)):
        for proc in running():
            with suppress(psutil.Error):
                proc.send_signal(signum)
        deadline = time.monotonic() + wait_s
        while running() and time.monotonic() < deadline:
            time.sleep(0.1)


def _session(record: ProcessId) -> list[psutil.Process]:
    return _running(psutil.process_iter(), session=record)


def _running(procs, session: ProcessId | None = None) -> list[psutil.Process]:
    """Those of `procs` still running (not exited, not a reused pid, not a zombie); with `session`, only the members
    of the session that process led, started no earlier than it (a reused session id is left alone)."""
    def keep(proc: psutil.Process) -> bool:
        try:
            member = session is None or (os.getsid(proc.pid) == session.pid and proc.create_time() >= session.start_time)
            return member and proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
        except (OSError, psutil.Error):
            return False

    return [proc for proc in procs if keep(proc)]


def listening(host: str, port: int, timeout: float = 0.5) -> bool:
    """Whether something accepts connections on host:port (a port in use)."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """`count` distinct ports free now (all held open while they are chosen, so none is handed out twice)."""
    with ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) for _ in range(count)]
        for s in sockets:
            s.bind((host, 0))
        return [s.getsockname()[1] for s in sockets]
