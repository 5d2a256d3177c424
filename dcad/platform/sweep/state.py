"""The sweep directory `STORAGE/NAME` and its state file (MLflow parent run, Optuna study); layout in docs/cluster.md."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

from dcad.platform.errors import PlatformError
from dcad.platform.storage import StorageLocation, read_text, resolve_storage
from dcad.platform.sweep.spec import SweepSpec

STATE_FILE = "sweep_state.json"
SPEC_FILE = "spec.yaml"
STUDY_DB = "optuna.db"
TUNE_DIR = "tune"


class SweepError(PlatformError):
    """A sweep cannot start or resume (the message says what to do)."""


@dataclass
class SweepState:
    name: str
    spec_digest: str
    study_storage: str
    parent_run_id: str | None = None
    tracking_uri: str | None = None
    started_at: str = ""


@dataclass(frozen=True)
class SweepDir:
    """Where one sweep lives: the storage root and the sweep's directory below it."""

    storage: StorageLocation
    name: str

    @property
    def root(self) -> str:
        """The sweep directory as a path or s3:// URI (what the trials resolve again)."""
        return f"{self.storage.root.rstrip('/')}/{self.name}"

    @property
    def local_dir(self) -> Path | None:
        return None if self.storage.is_s3 else Path(self.storage.path) / self.name

    def path(self, *parts: str) -> str:
        return self.storage.join(self.name, *parts)

    def describe(self) -> str:
        return self.storage.describe(self.name)

    def read_state(self) -> SweepState | None:
        text = read_text(self.storage, self.path(STATE_FILE))
        try:
            return None if text is None else SweepState(**json.loads(text))
        except (ValueError, TypeError):
            raise SweepError(f"{self.describe()}/{STATE_FILE}: unreadable sweep state (delete the sweep directory to start over)") from None

    def write_state(self, state: SweepState) -> None:
        self.write_text(STATE_FILE, json.dumps(asdict(state), indent=2))

    def write_text(self, name: str, text: str) -> None:
        if self.local_dir is not None:
            self.local_dir.mkdir(parents=True, exist_ok=True)
        with self.storage.arrow_fs().open_output_stream(self.path(name)) as out:
            out.write(text.encode("utf-8"))

    def study_url(self, spec: SweepSpec) -> str:
        """The Optuna storage: the spec's `study_storage`, else sqlite in the sweep directory (under the local
        dcad home for a sweep on S3, where sqlite cannot live)."""
        from dcad.platform.mlflow_store import dcad_home

        directory = self.local_dir or dcad_home() / "sweeps" / self.name
        return spec.study_storage or f"sqlite:///{directory.resolve() / STUDY_DB}"


def sweep_dir(spec: SweepSpec, storage: str | None = None) -> SweepDir:
    """The sweep's directory: `--storage` (or the spec's `storage`) joined with the sweep name."""
    return SweepDir(resolve_storage(storage or spec.storage, Path(spec.storage)), spec.name)


def spec_digest(spec: SweepSpec) -> str:
    """A digest of what decides the trials (search space, objectives, base config, data); resources may change."""
    keys = {"base", "dataset", "search_space", "objective", "sampler", "early_stopping", "num_trials"}
    return hashlib.sha256(json.dumps(spec.model_dump(mode="json", include=keys), sort_keys=True).encode()).hexdigest()[:16]
