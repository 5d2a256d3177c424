"""Errors of `dcad stack`: one line naming the service, port or file."""

from __future__ import annotations

from dcad.platform.errors import PlatformError


class StackError(PlatformError):
    """A stack service cannot start, a port is taken, or the state file is unusable."""
