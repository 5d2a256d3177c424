"""The stack's state file (`.dcad/stack/stack.json`): what `up` started, so `status` and `down` act on exactly that.

It holds pids, start times, command lines, ports, URLs and log files; never a credential.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from dcad.platform.stack.errors import StackError
from dcad.platform.stack.procs import ProcessId

STATE_FILE = "stack.json"
FORMAT = "dcad-stack"


@dataclass
class ServiceRecord:
    name: str  # postgres | s3 | mlflow | ray
    pid: int
    start_time: int
    cmdline: list[str]
    host: str
    port: int
    url: str
    log: str
    details: dict[str, Any] = field(default_factory=dict)  # e.g. backend, data_dir, temp_dir

    @property
    def process(self) -> ProcessId:
        return ProcessId(self.pid, self.start_time, tuple(self.cmdline))


@dataclass
class StackState:
    path: Path
    services: list[ServiceRecord] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)  # what clients export (no secrets)
    created: str = ""

    @classmethod
    def load(cls, state_dir: Path) -> "StackState | None":
        path = state_dir / STATE_FILE
        if not path.is_file():
            return None
        try:
            data = json.loads(path.read_text())
            services = [ServiceRecord(**s) for s in data["services"]]
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise StackError(f"{path}: unreadable stack state ({type(err).__name__}); stop the processes by hand and delete it") from None
        return cls(path, services, dict(data.get("env", {})), data.get("created", ""))

    def service(self, name: str) -> ServiceRecord | None:
        return next((s for s in self.services if s.name == name), None)

    def add(self, record: ServiceRecord) -> None:
        self.services.append(record)
        self.save()

    def save(self) -> None:
        data = {"format": FORMAT, "created": self.created, "env": self.env, "services": [asdict(s) for s in self.services]}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=2))
        os.replace(tmp, self.path)

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)
