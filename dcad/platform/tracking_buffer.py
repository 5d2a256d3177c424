"""Writes to an MLflow store that stopped answering: kept in order and replayed when it is back (docs/cluster.md §4)."""

from __future__ import annotations

import functools
import os
import shutil
import sys
import tempfile
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any, Callable

from dcad.platform.errors import describe

BACKOFF_S = (1.0, 2.0, 4.0, 8.0)  # then every 8 s
WAIT_ENV = "DCAD_TRACKING_WAIT_S"  # how long a command's end (or a trial's start) waits for a store that went away
DEFAULT_WAIT_S = 300.0
_UNREACHABLE = (
    "connection refused", "connection reset", "connection aborted", "max retries exceeded", "remotedisconnected",
    "timed out", "timeout", "temporarily unavailable", "bad gateway", "service unavailable", "gateway timeout",
    "status code 500", "status code 502", "status code 503", "status code 504", "database is locked",
    "newconnectionerror", "failed to establish a new connection", "name or service not known", "is unreachable",
    "is unhealthy",
)


def store_wait_s() -> float:
    return float(os.environ.get(WAIT_ENV, DEFAULT_WAIT_S))


def unreachable(err: BaseException) -> bool:
    """Whether `err` says the store did not answer (worth retrying) rather than that it refused the write."""
    text = f"{type(err).__name__} {err}".lower()
    return isinstance(err, (ConnectionError, TimeoutError)) or any(marker in text for marker in _UNREACHABLE)


def _stderr(line: str) -> None:
    print(f"dcad: {line}", file=sys.stderr, flush=True)


def _retry(fn: Callable[[], Any], give_up: Callable[[], bool], on_wait: Callable[[BaseException], None] = lambda e: None):
    """`fn()`, retried with backoff while the store is unreachable and `give_up()` is False."""
    attempt = 0
    while True:
        try:
            return fn()
        except Exception as err:
            if not unreachable(err) or give_up():
                raise
            if attempt == 0:
                on_wait(err)
            time.sleep(BACKOFF_S[min(attempt, len(BACKOFF_S) - 1)])
            attempt += 1


class WriteBuffer:
    """Ordered writes to one store: run at once while it answers, else queued and replayed by a thread;
    `broken` names the write the store refused (every later write is dropped)."""

    def __init__(self, store: str) -> None:
        self.store = store
        self.broken: str | None = None
        self.reason: str | None = None  # why the store is unreachable, while writes are queued
        self.replayed = 0
        self._queue: deque[tuple[str, Callable[[], Any]]] = deque()
        self._idle = threading.Condition()
        self._worker: threading.Thread | None = None
        self._spool: Path | None = None  # copies of files to upload: the caller's temporary directory goes
        self._stopped = False

    @property
    def pending(self) -> int:
        return len(self._queue)

    def submit(self, what: str, write: Callable[..., Any], source: Path | None = None) -> Any:
        """`write()` (or `write(source)`, a file or directory to upload) now, or queued; its result or None."""
        with self._idle:
            if self.broken is not None or self._stopped:
                return None
            if not self._queue:
                try:
                    return write(source) if source is not None else write()
                except Exception as err:  # noqa: BLE001 - classified: queued, or tracking ends
                    if not unreachable(err):
                        self.broken = f"{what}: {describe(err)}"
                        return None
                    self.reason = f"{what}: {describe(err)}"
                    _stderr(f"tracking store {self.store} unreachable ({self.reason}); "
                            "training goes on, writes are kept and replayed when it is back")
            self._queue.append((what, write if source is None else functools.partial(write, self._keep(source))))
            if self._worker is None:
                self._worker = threading.Thread(target=self._replay, name="dcad-tracking-replay", daemon=True)
                self._worker.start()
            return None

    def drain(self, timeout: float) -> bool:
        """Wait up to `timeout` s for every queued write to reach the store; False (and nothing more is sent) if not."""
        deadline = time.monotonic() + timeout
        with self._idle:
            if self._queue and timeout > 0:
                _stderr(f"waiting up to {timeout:.0f} s for the tracking store to take {len(self._queue)} kept write(s)")
            while self._queue and self.broken is None:
                if time.monotonic() >= deadline:
                    self._stopped = True  # nothing more is sent: the kept copies are of no use
                    self._discard_spool()
                    return False
                self._idle.wait(min(deadline - time.monotonic(), 1.0))
            return not self._queue

    def _keep(self, source: Path) -> Path:
        if self._spool is None:
            self._spool = Path(tempfile.mkdtemp(prefix="dcad-tracking-spool-"))
        target = self._spool / str(len(list(self._spool.iterdir()))) / source.name
        target.parent.mkdir(parents=True)
        (shutil.copytree if source.is_dir() else shutil.copy2)(source, target)
        return target

    def _discard_spool(self) -> None:
        if self._spool is not None:
            shutil.rmtree(self._spool, ignore_errors=True)
            self._spool = None

    def _replay(self) -> None:
        while True:
            with self._idle:
                if self._stopped or not self._queue:
                    self._worker = None
                    self._idle.notify_all()
                    self._discard_spool()
                    return
                what, write = self._queue[0]
            try:
                _retry(write, give_up=lambda: self._stopped)
            except Exception as err:  # noqa: BLE001 - stopped while unreachable, or refused: tracking ends
                with self._idle:
                    if not unreachable(err) and not self._stopped:  # a write cut by `drain` giving up is no refusal
                        self.broken = f"{what}: {describe(err)}"
                        self._queue.clear()
                continue
            with self._idle:
                self._queue.popleft()
                self.replayed += 1
                if not self._queue:
                    _stderr(f"tracking store {self.store} is back: {self.replayed} kept write(s) replayed")


def call_when_reachable(fn: Callable[[], Any], what: str) -> Any:
    """`fn()`, retried with backoff for up to `store_wait_s()` s while the store is unreachable."""
    wait_s = store_wait_s()
    deadline = time.monotonic() + wait_s
    return _retry(fn, give_up=lambda: time.monotonic() >= deadline, on_wait=lambda err: _stderr(
        f"{what}: the tracking store is unreachable ({describe(err)}); waiting up to {wait_s:.0f} s"))
