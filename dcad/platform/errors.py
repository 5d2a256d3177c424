"""Errors of the MLOps layer; every message is redacted before anyone can print it."""

from __future__ import annotations

import re
from contextlib import contextmanager
from typing import Iterator

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


@contextmanager
def store_errors(what: str, error: type[PlatformError] = TrackingError) -> Iterator[None]:
    """Turn MLflow, HTTP and S3 client failures inside the block into one redacted line."""
    try:
        yield
    except DcadError:
        raise
    except Exception as err:  # MlflowException, requests/botocore errors, sqlite errors
        if not _is_store_failure(err):
            raise
        raise error(f"{what}: {describe(err)}") from None


def _is_store_failure(err: Exception) -> bool:
    module = type(err).__module__.split(".")[0]
    return module in ("mlflow", "requests", "urllib3", "botocore", "boto3", "sqlalchemy") or isinstance(err, OSError)


_NETWORK_HINTS = ("connection refused", "name or service not known", "timed out", "no route to host", "connection reset", "max retries exceeded")


def describe(err: BaseException, limit: int = 300) -> str:
    """A short, redacted reason: the network failure when there is one, else the first line of the message."""
    text = str(getattr(err, "message", None) or err or type(err).__name__).strip()
    low = text.lower()
    for hint in _NETWORK_HINTS:
        if hint in low:
            endpoint = re.search(r"url: (/[^\s(]*)", text)
            return hint + (f" ({endpoint.group(1)})" if endpoint else "")
    return redact(text.splitlines()[0] if text else type(err).__name__)[:limit]
