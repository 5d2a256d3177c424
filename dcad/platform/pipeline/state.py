"""What a pipeline run has done so far: `<work_dir>/pipeline-state.json`, rewritten after every step.

A step counts as finished when its status is `done` and its spec digest is unchanged; `--resume` skips
those and feeds their recorded outputs to the steps after them.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from dcad.platform.pipeline.errors import PipelineError

STATE_FILE = "pipeline-state.json"
FORMAT = "dcad-pipeline-state"


def now_utc() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@dataclass
class StepRecord:
    status: str  # running | done | failed
    digest: str
    started: str
    finished: str | None = None
    seconds: float | None = None
    outputs: dict[str, Any] = field(default_factory=dict)
    error: str | None = None


@dataclass
class PipelineState:
    path: Path
    pipeline: str
    source: str
    steps: dict[str, StepRecord] = field(default_factory=dict)

    @classmethod
    def fresh(cls, path: Path, pipeline: str, source: str) -> "PipelineState":
        return cls(path, pipeline, source)

    @classmethod
    def load(cls, path: Path, pipeline: str, source: str) -> "PipelineState":
        """The recorded state, or a fresh one if there is none; PipelineError if it belongs to another pipeline."""
        if not path.is_file():
            return cls.fresh(path, pipeline, source)
        try:
            data = json.loads(path.read_text())
            steps = {name: StepRecord(**record) for name, record in data["steps"].items()}
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise PipelineError(f"{path}: unreadable pipeline state ({type(err).__name__}); run without --resume to start over") from None
        if data.get("pipeline") != pipeline:
            raise PipelineError(f"{path}: state of pipeline '{data.get('pipeline')}', not '{pipeline}' (use another work_dir)")
        return cls(path, pipeline, source, steps)

    def finished(self, name: str, digest: str) -> StepRecord | None:
        record = self.steps.get(name)
        return record if record is not None and record.status == "done" and record.digest == digest else None

    def start(self, name: str, digest: str) -> None:
        self.steps[name] = StepRecord("running", digest, now_utc())
        self.save()

    def finish(self, name: str, outputs: dict[str, Any], seconds: float) -> None:
        record = self.steps[name]
        record.status, record.outputs, record.finished, record.seconds = "done", outputs, now_utc(), round(seconds, 2)
        self.save()

    def fail(self, name: str, error: str, seconds: float) -> None:
        record = self.steps[name]
        record.status, record.error, record.finished, record.seconds = "failed", error, now_utc(), round(seconds, 2)
        self.save()

    def save(self) -> None:
        data = {
            "format": FORMAT,
            "pipeline": self.pipeline,
            "source": self.source,
            "updated": now_utc(),
            "steps": {name: asdict(record) for name, record in self.steps.items()},
        }
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=2, default=str))
        os.replace(tmp, self.path)
