"""Errors of the MLOps layer; every message is redacted before anyone can print it."""

from __future__ import annotations

import re
from contextlib import contextmanager
from typing import Iterator

from dcad.core.errors import DcadError
from dcad.platform.secrets import redact

_STORE_MODULES = ("mlflow", "requests", "urllib3", "botocore", "boto3", "sqlalchemy")
_NETWORK_HINTS = ("connection refused", "name or service not known", "timed out", "no route to host", "connection reset",
                  "max retries exceeded")
_AWS_ERROR = re.compile(r"AWS Error (?P<code>\w+) during \w+ operation: (?P<msg>[^;(\n]*)")  # pyarrow's S3 errors


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
    """Turn MLflow, HTTP, S3 and OS failures inside the block into one redacted line."""
    try:
        yield
    except DcadError:
        raise
    except Exception as err:
        if type(err).__module__.split(".")[0] not in _STORE_MODULES and not isinstance(err, OSError):
            raise
        raise error(f"{what}: {describe(err)}") from None


def describe(err: BaseException, limit: int = 300) -> str:
    """A short, redacted reason: the AWS error code and message, else the network failure, else the first line."""
    text = str(getattr(err, "message", None) or err or type(err).__name__).strip()
    aws = _AWS_ERROR.search(text)
    if aws:
        return redact(f"{aws['code']}: {' '.join(aws['msg'].split())}")[:limit]
    for hint in _NETWORK_HINTS:
        if hint in text.lower():
            endpoint = re.search(r"url: (/[^\s(]*)", text)
            return hint + (f" ({endpoint.group(1)})" if endpoint else "")
    return redact(text.splitlines()[0] if text else type(err).__name__)[:limit]
