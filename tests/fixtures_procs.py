"""Process helpers for the tests that check no process is left behind (psutil)."""

from __future__ import annotations

import psutil


def descendants(pid: int) -> list[int]:
    """Children, grandchildren … of `pid` (empty when it is gone)."""
    try:
        return [child.pid for child in psutil.Process(pid).children(recursive=True)]
    except psutil.Error:
        return []


def read_cmdline(pid: int) -> tuple[str, ...] | None:
    """The command line of a live process (None when it is gone or a zombie)."""
    try:
        return tuple(psutil.Process(pid).cmdline()) or None
    except psutil.Error:
        return None
