"""The shared training stages of one sweep, kept in its storage: `STORAGE/NAME/stages/KIND-FINGERPRINT.pt`.

KIND is `features` (the feature cache of a dataset and backbone), `base` (a trained base branch) or
`weights` (every trained weight of a model but its calibration); FINGERPRINT is
`dcad.train.shared_stages.fingerprint` of the config keys that produced it. A trial looks up the latest
stage it can start from (`best_start`) and publishes what it trained (`publish`), so trials that differ
only in later keys train the earlier stages once. Local storage and S3 alike: a file is written whole
(a temporary sibling renamed, or one S3 PUT), so a reader never loads half a stage.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any

from dcad.platform.storage import StorageLocation, download_file, upload_file
from dcad.train import shared_stages as ss

STAGES_DIR = "stages"
logger = logging.getLogger("dcad.sweep")
_LOADERS = {"features": ss.load_features, "base": ss.load_base, "weights": ss.load_weights}
_SAVERS = {"features": ss.save_features, "base": ss.save_base, "weights": ss.save_weights}
_FINGERPRINT_STAGE = {"features": "features", "base": "base", "weights": "refiner"}


class StageStore:
    def __init__(self, location: StorageLocation, dataset_digest: str = "") -> None:
        self.location, self.digest = location, dataset_digest

    def key(self, kind: str, cfg) -> str:
        return f"{kind}-{ss.fingerprint(cfg, _FINGERPRINT_STAGE[kind], self.digest)}.pt"

    def path(self, name: str) -> str:
        return self.location.join(STAGES_DIR, name)

    def has(self, kind: str, cfg) -> bool:
        import pyarrow.fs

        info = self.location.arrow_fs().get_file_info(self.path(self.key(kind, cfg)))
        return info.type == pyarrow.fs.FileType.File

    def fetch(self, kind: str, cfg) -> Any | None:
        """The stored stage for `cfg`, or None (absent, or unreadable: then it is trained again)."""
        if not self.has(kind, cfg):
            return None
        name = self.key(kind, cfg)
        tmp = Path(tempfile.mkdtemp(prefix="dcad-stage-"))
        try:
            local = tmp / name
            if self.location.is_s3:
                download_file(self.location.arrow_fs(), self.path(name), local)
            else:
                local = Path(self.path(name))
            return _LOADERS[kind](local)
        except Exception as err:  # noqa: BLE001 - a damaged stage is trained again, never trusted
            logger.warning(f"shared stage {name} unreadable ({str(err).splitlines()[0][:200]}); training it again")
            return None
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def publish(self, kind: str, cfg, result) -> str:
        """Store `result` (a FeatureCache, TrainedBase or TrainedWeights) for the trainings after this one."""
        name = self.key(kind, cfg)
        if not self.location.is_s3:
            _SAVERS[kind](result, Path(self.path(name)))  # written to a temporary sibling, then renamed
            return name
        tmp = Path(tempfile.mkdtemp(prefix="dcad-stage-"))
        try:
            _SAVERS[kind](result, tmp / name)
            upload_file(self.location.arrow_fs(), tmp / name, self.path(name))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return name

    def best_start(self, cfg):
        """The latest stored stage `cfg` can start from (a `StageStart`): its trained weights, else its base,
        else its features, else nothing."""
        from dcad.train.pipeline import StageStart

        weights = self.fetch("weights", cfg)
        if weights is not None:
            return StageStart(weights=weights)
        base = self.fetch("base", cfg)
        if base is not None:
            return StageStart(base=base)
        return StageStart(features=self.fetch("features", cfg))
