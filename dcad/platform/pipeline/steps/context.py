"""What every step executor gets besides its own (resolved) spec."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from dcad.core.json_io import write_json  # noqa: F401  (re-exported for the steps)
from dcad.platform.pipeline.errors import PipelineError


@dataclass(frozen=True)
class StepContext:
    pipeline: str
    work_dir: Path
    tracking_uri: str
    experiment: str
    device: str
    resume: bool
    log: Callable[[str], None]

    def tags(self, step: str) -> dict[str, str]:
        """MLflow tags that tie a run to the pipeline step that made it."""
        return {"dcad.pipeline": self.pipeline, "dcad.pipeline.step": step}


class StopPipeline(PipelineError):
    """A step finished but its outcome stops the pipeline (e.g. the promotion gate refused); exit code 3."""

    exit_code = 3

    def __init__(self, message: str, outputs: dict[str, Any]) -> None:
        super().__init__(message)
        self.outputs = outputs


def existing_dir(value: str | None, step: str, key: str) -> Path:
    """`value` as a directory that exists, else a PipelineError naming the step and key."""
    if not value:
        raise PipelineError(f"step {step}: '{key}' is empty")
    path = Path(value)
    if not path.is_dir():
        raise PipelineError(f"step {step}: {key} {path}: no such directory")
    return path
