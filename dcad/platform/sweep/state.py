"""The sweep directory `STORAGE/NAME`: its state file (MLflow parent run, Optuna study) and its layout.

    STORAGE/NAME/sweep_state.json   parent run id, study storage URL, spec digest, when it started
    STORAGE/NAME/spec.yaml          the spec as it was first run
    STORAGE/NAME/optuna.db          the Optuna study (local storage only; see search.study_url)
    STORAGE/NAME/tune/              the Tune experiment (what `Tuner.restore` reads; one-worker trials'
                                    checkpoints in tune/trial_ID/checkpoint_*)
    STORAGE/NAME/stages/            training stages the trials share (`dcad.platform.stage_store`)
    STORAGE/NAME/trials/trial-ID/   a multi-worker trial's Ray Train run (checkpoints)
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

from dcad.platform.errors import PlatformError
from dcad.platform.storage import StorageLocation, read_text, resolve_storage
from dcad.platform.sweep.spec import SweepSpec

STATE_FILE = "sweep_state.json"
SPEC_FILE = "spec.yaml"
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
        if text is None:
            return None
        try:
            return SweepState(**json.loads(text))
        except (ValueError, TypeError):
            raise SweepError(f"{self.describe()}/{STATE_FILE}: unreadable sweep state (delete the sweep directory to start over)") from None

    def write_state(self, state: SweepState) -> None:
        self.write_text(STATE_FILE, json.dumps(asdict(state), indent=2))

    def write_text(self, name: str, text: str) -> None:
        fs = self.storage.arrow_fs()
        if self.local_dir is not None:
            self.local_dir.mkdir(parents=True, exist_ok=True)
        with fs.open_output_stream(self.path(name)) as out:
            out.write(text.encode("utf-8"))


def sweep_dir(spec: SweepSpec, storage: str | None = None) -> SweepDir:
    """The sweep's directory: `--storage` (or the spec's `storage`) joined with the sweep name."""
    location = resolve_storage(storage or spec.storage, Path(spec.storage))
    return SweepDir(location, spec.name)


def spec_digest(spec: SweepSpec) -> str:
    """A digest of what decides the trials (search space, objectives, base config, data); resources may change."""
    keys = ("base", "dataset", "search_space", "objective", "sampler", "early_stopping", "num_trials")
    data = spec.model_dump(mode="json", include=set(keys))
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def now_utc() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
