"""What `dcad stack up` is asked for (StackOptions) and what it started: the state file `STATE_DIR/stack.json` (never a credential)."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import psutil

from dcad.core.json_io import write_json
from dcad.platform.errors import PlatformError
from dcad.platform.stack.procs import ProcessId


class StackError(PlatformError):
    """A stack service cannot start, a port is taken, or the state file is unusable."""


@dataclass
class StackOptions:
    state_dir: Path
    host: str = "127.0.0.1"
    mlflow_port: int = 5000
    s3_port: int = 9000
    ray_port: int = 6379
    postgres_port: int = 5433  # 5432 is often the system's own PostgreSQL
    backend: Literal["auto", "postgres", "sqlite"] = "auto"
    postgres_uri: str | None = None  # an existing PostgreSQL database instead of starting one
    postgres_bin: Path | None = None
    bucket: str = "dcad-artifacts"
    ray: bool = True
    ray_cpus: int | None = None
    timeout_s: float = 180.0


@dataclass
class ServiceRecord:
    name: str  # postgres | s3 | mlflow | ray
    pid: int
    start_time: float
    cmdline: list[str]
    host: str
    port: int
    url: str
    log: str
    details: dict[str, Any] = field(default_factory=dict)  # e.g. backend, data_dir, temp_dir

    @property
    def process(self) -> ProcessId:
        return ProcessId(self.pid, _seconds(self.start_time), tuple(self.cmdline))


def _seconds(start_time: float) -> float:
    """A start time in psutil's epoch seconds; state files of earlier versions hold clock ticks since boot."""
    if start_time >= 1e9:
        return start_time
    return psutil.boot_time() + start_time / os.sysconf("SC_CLK_TCK")


@dataclass
class StackState:
    path: Path
    services: list[ServiceRecord] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)  # what clients export (no secrets)
    created: str = ""

    @classmethod
    def load(cls, state_dir: Path) -> StackState | None:
        path = state_dir / "stack.json"
        if not path.is_file():
            return None
        try:
            data = json.loads(path.read_text())
            services = [ServiceRecord(**s) for s in data["services"]]
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise StackError(f"{path}: unreadable stack state ({type(err).__name__}); stop the processes by hand and delete it") from None
        return cls(path, services, dict(data.get("env", {})), data.get("created", ""))

    def add(self, record: ServiceRecord) -> None:
        self.services.append(record)
        self.save()

    def save(self) -> None:
        data = {"format": "dcad-stack", "created": self.created, "env": self.env, "services": [asdict(s) for s in self.services]}
        write_json(self.path, data, atomic=True)

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)
