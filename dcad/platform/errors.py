"""Errors of the MLOps layer; every message is redacted before anyone can print it."""

from __future__ import annotations

from dcad.core.errors import DcadError
from dcad.platform.secrets import redact


class PlatformError(DcadError):
    """Base of tracking, registry and storage errors: the message never carries a credential."""

    def __init__(self, message: str) -> None:
        super().__init__(redact(message))


class TrackingError(PlatformError):
    """The tracking store cannot be reached or refused a request."""


class TrackingLostError(PlatformError):
    """The tracking server went away during a run; the local model directory is complete."""

    exit_code = 3


class RegistryError(PlatformError):
    """A promotion, rollback or lookup names a model, version, run or alias that is not valid."""


class GateRefusedError(PlatformError):
    """The candidate regressed against the alias holder; the alias was not moved."""

    exit_code = 3
