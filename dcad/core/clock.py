"""Wall-clock timestamps as written into state files, registries and model directories."""

from __future__ import annotations

from datetime import datetime, timezone


def now_utc() -> str:
    """The current UTC time, ISO 8601 to the second (e.g. `2026-12-07T13:01:07+00:00`)."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
