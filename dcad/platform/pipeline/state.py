"""What a pipeline run has done so far: `<work_dir>/pipeline-state.json`, rewritten after every step."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dcad.core.clock import now_utc
from dcad.core.json_io import write_json
from dcad.platform.pipeline.spec import PipelineError

STATE_FILE = "pipeline-state.json"


@dataclass
class PipelineState:
    path: Path
    pipeline: str
    source: str
    steps: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> status, digest, started, finished, ...

    @classmethod
    def load(cls, path: Path, pipeline: str, source: str) -> "PipelineState":
        """The recorded state, or a fresh one if there is none; PipelineError if it belongs to another pipeline."""
        if not path.is_file():
            return cls(path, pipeline, source)
        try:
            data = json.loads(path.read_text())
            steps = {name: dict(record) for name, record in data["steps"].items()}
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise PipelineError(f"{path}: unreadable pipeline state ({type(err).__name__}); run without --resume to start over") from None
        if data.get("pipeline") != pipeline:
            raise PipelineError(f"{path}: state of pipeline '{data.get('pipeline')}', not '{pipeline}' (use another work_dir)")
        return cls(path, pipeline, source, steps)

    def finished(self, name: str, digest: str) -> dict[str, Any] | None:
        """The step's record if its status is `done` and its spec digest unchanged (`--resume` skips it)."""
        record = self.steps.get(name)
        return record if record and record.get("status") == "done" and record.get("digest") == digest else None

    def start(self, name: str, digest: str) -> None:
        self.steps[name] = {"status": "running", "digest": digest, "started": now_utc(), "finished": None,
                            "seconds": None, "outputs": {}, "error": None}
        self.save()

    def end(self, name: str, seconds: float, outputs: dict[str, Any] | None = None, error: str | None = None) -> None:
        """The step is done (with its outputs), or failed with `error`."""
        self.steps[name].update(status="failed" if error else "done", outputs=outputs or {}, error=error,
                                finished=now_utc(), seconds=round(seconds, 2))
        self.save()

    def save(self) -> None:
        data = {"format": "dcad-pipeline-state", "pipeline": self.pipeline, "source": self.source, "updated": now_utc(), "steps": self.steps}
        write_json(self.path, data, atomic=True)
