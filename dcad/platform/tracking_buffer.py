"""Writes to an MLflow store that stopped answering: kept in order and replayed when it is back.

A `RunTracker` sends each write through a `WriteBuffer`. While the store answers, a write runs at once in
the caller's thread. When one fails because the store is unreachable (connection refused or reset, a
timeout, a 5xx answer, a locked sqlite file), that write and every later one are queued, and a background
thread retries the oldest with backoff until the store answers again; the caller's training never waits
for it. A queued write keeps what it was given: metric timestamps are taken when the caller logs, and
files to upload are copied into a spool directory first (a caller's temporary directory is gone by the
time the store is back). `drain(timeout)` is the end of a command: it waits for the queue to empty.

An S3 artifact store that does not answer is not retried here: botocore's own retry mode does that
(`dcad.platform.s3`), and when it gives up the upload counts as refused. A write that fails for another
reason (a rejected value, a missing run) is not retried either: the buffer records
why in `broken` and drops every later write, and the caller ends with the `dcad log` command that uploads
the model directory (`tracking.log_model_dir` is idempotent).
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from dcad.platform.errors import describe

BACKOFF_S = (1.0, 2.0, 4.0, 8.0)  # then every 8 s
WAIT_ENV = "DCAD_TRACKING_WAIT_S"  # how long a command's end (or a trial's start) waits for a store that went away
DEFAULT_WAIT_S = 300.0


def store_wait_s() -> float:
    return float(os.environ.get(WAIT_ENV, DEFAULT_WAIT_S))
_UNREACHABLE = (
    "connection refused", "connection reset", "connection aborted", "max retries exceeded", "remotedisconnected",
    "timed out", "timeout", "temporarily unavailable", "bad gateway", "service unavailable", "gateway timeout",
    "status code 500", "status code 502", "status code 503", "status code 504", "database is locked",
    "newconnectionerror", "failed to establish a new connection", "name or service not known", "is unreachable",
    "is unhealthy",
)


def unreachable(err: BaseException) -> bool:
    """Whether `err` says the store did not answer (worth retrying) rather than that it refused the write."""
    if isinstance(err, (ConnectionError, TimeoutError)):
        return True
    text = f"{type(err).__name__} {err}".lower()
    return any(marker in text for marker in _UNREACHABLE)


@dataclass
class PendingWrite:
    what: str
    run: Callable[[], Any]


class WriteBuffer:
    """Ordered writes to one store: inline while it answers, queued and replayed while it does not."""

    def __init__(self, store: str, notify: Callable[[str], None] | None = None) -> None:
        self.store = store
        self.notify = notify or (lambda line: print(f"dcad: {line}", file=sys.stderr, flush=True))
        self.broken: str | None = None  # a write the store refused: tracking ends
        self.reason: str | None = None  # why the store is unreachable, while writes are queued
        self.replayed = 0
        self._queue: deque[PendingWrite] = deque()
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._worker: threading.Thread | None = None
        self._spool: Path | None = None
        self._stopped = False

    @property
    def pending(self) -> int:
        return len(self._queue)

    def submit(self, what: str, write: Callable[..., Any], source: Path | None = None) -> Any:
        """Run `write()` (or `write(source)`, a file or directory to upload), or queue it; returns its result or None."""
        with self._lock:
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
                    self.notify(f"tracking store {self.store} unreachable ({self.reason}); "
                                "training goes on, writes are kept and replayed when it is back")
            self._queue.append(self._pending(what, write, source))
            if self._worker is None:
                self._worker = threading.Thread(target=self._replay, name="dcad-tracking-replay", daemon=True)
                self._worker.start()
            return None

    def drain(self, timeout: float) -> bool:
        """Wait up to `timeout` s for every queued write to reach the store; False if some did not."""
        deadline = time.monotonic() + timeout
        with self._idle:
            if self._queue and timeout > 0:
                self.notify(f"waiting up to {timeout:.0f} s for the tracking store to take {len(self._queue)} kept write(s)")
            while self._queue and self.broken is None:
                left = deadline - time.monotonic()
                if left <= 0:
                    self._stopped = True  # the caller gives up; nothing more is sent
                    return False
                self._idle.wait(min(left, 1.0))
            return not self._queue

    # ---- internals --------------------------------------------------------------------------------
    def _pending(self, what: str, write: Callable[..., Any], source: Path | None) -> PendingWrite:
        if source is None:
            return PendingWrite(what, write)
        kept = self._keep(source)
        return PendingWrite(what, lambda: write(kept))

    def _keep(self, source: Path) -> Path:
        """A copy of `source` that outlives the caller's temporary directory."""
        if self._spool is None:
            self._spool = Path(tempfile.mkdtemp(prefix="dcad-tracking-spool-"))
        target = self._spool / str(len(list(self._spool.iterdir()))) / source.name
        target.parent.mkdir(parents=True)
        if source.is_dir():
            shutil.copytree(source, target)
        else:
            shutil.copy2(source, target)
        return target

    def _replay(self) -> None:
        attempt = 0
        while True:
            with self._lock:
                if self._stopped or not self._queue:
                    self._finish_replay()
                    return
                head = self._queue[0]
            try:
                head.run()
            except Exception as err:  # noqa: BLE001 - classified as in submit
                if not unreachable(err):
                    with self._lock:
                        self.broken = f"{head.what}: {describe(err)}"
                        self._queue.clear()
                        self._finish_replay()
                    return
                time.sleep(BACKOFF_S[min(attempt, len(BACKOFF_S) - 1)])
                attempt += 1
                continue
            attempt = 0
            with self._lock:
                self._queue.popleft()
                self.replayed += 1
                if not self._queue:
                    self.notify(f"tracking store {self.store} is back: {self.replayed} kept write(s) replayed")
                    self._finish_replay()
                    return

    def _finish_replay(self) -> None:
        """With the lock held: the worker ends; waiters in `drain` wake up; the spool goes."""
        self._worker = None
        self._idle.notify_all()
        if self._spool is not None and not self._queue:
            shutil.rmtree(self._spool, ignore_errors=True)
            self._spool = None


def call_when_reachable(fn: Callable[[], Any], what: str, wait_s: float | None = None,
                        notify: Callable[[str], None] | None = None) -> Any:
    """`fn()`, retried with backoff for up to `wait_s` seconds (default `store_wait_s()`) while the store is
    unreachable (a sweep trial that starts while the tracking server restarts waits for it instead of failing)."""
    wait_s = store_wait_s() if wait_s is None else wait_s
    deadline, attempt = time.monotonic() + wait_s, 0
    while True:
        try:
            return fn()
        except Exception as err:
            if not unreachable(err) or time.monotonic() >= deadline:
                raise
            if attempt == 0:
                (notify or (lambda line: print(f"dcad: {line}", file=sys.stderr, flush=True)))(
                    f"{what}: the tracking store is unreachable ({describe(err)}); waiting up to {wait_s:.0f} s")
            time.sleep(BACKOFF_S[min(attempt, len(BACKOFF_S) - 1)])
            attempt += 1
