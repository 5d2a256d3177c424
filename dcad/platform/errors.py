"""Errors of the MLOps layer; every message is redacted before anyone can print it."""

from __future__ import annotations

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
        text = getattr(err, "message", None) or str(err) or type(err).__name__
        raise error(f"{what}: {str(text).strip().splitlines()[0][:300]}") from None


def _is_store_failure(err: Exception) -> bool:
    module = type(err).__module__.split(".")[0]
    return module in ("mlflow", "requests", "urllib3", "botocore", "boto3", "sqlalchemy") or isinstance(err, OSError)
