"""Errors of `dcad pipeline`: a bad spec or a step that cannot run, as one line naming the file and key."""

from __future__ import annotations

from dcad.platform.errors import PlatformError


class PipelineError(PlatformError):
    """The pipeline file is invalid, or a step's inputs cannot be resolved."""
