"""Errors users see as one clear line (the CLI prints the message and exits non-zero)."""


class DcadError(Exception):
    """Base of every error caused by bad input; the message names what is wrong."""

    exit_code = 2


class DatasetError(DcadError):
    """A dataset file or layout is invalid (the message names the file)."""


class ModelError(DcadError):
    """A model directory is missing, foreign, or incompatible."""


class WeightsError(DcadError):
    """Backbone weights cannot be resolved offline."""


class MetricsError(DcadError):
    """Inputs to the anomaly-detection metrics are inconsistent (the message names the argument)."""


def first_line(err: BaseException, limit: int = 300) -> str:
    """The first non-empty line of an exception's message (its type's name if it has none), cut at `limit`."""
    text = str(err).strip()
    return (text.splitlines()[0] if text else type(err).__name__)[:limit]
