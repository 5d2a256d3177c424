"""The training stages a sweep's trials share, kept in its storage as `STORAGE/NAME/stages/KIND-FINGERPRINT.pt`.

KIND is `features`, `base` or `weights` (every trained weight but the calibration); FINGERPRINT is
`shared_stages.fingerprint` of the config keys that produced it. A stage is written whole (renamed, or one S3 PUT).
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Any

from dcad.platform.errors import describe
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
        try:
            with tempfile.TemporaryDirectory(prefix="dcad-stage-", ignore_cleanup_errors=True) as tmp:
                local = Path(self.path(name))
                if self.location.is_s3:
                    local = Path(tmp) / name
                    download_file(self.location.arrow_fs(), self.path(name), local)
                return _LOADERS[kind](local)
        except Exception as err:  # noqa: BLE001 - a damaged stage is trained again, never trusted
            logger.warning(f"shared stage {name} unreadable ({describe(err, 200)}); training it again")
            return None

    def publish(self, kind: str, cfg, result) -> str:
        """Store `result` (a FeatureCache, TrainedBase or TrainedWeights) for the trainings after this one."""
        name = self.key(kind, cfg)
        if not self.location.is_s3:
            _SAVERS[kind](result, Path(self.path(name)))  # written to a temporary sibling, then renamed
            return name
        with tempfile.TemporaryDirectory(prefix="dcad-stage-", ignore_cleanup_errors=True) as tmp:
            _SAVERS[kind](result, Path(tmp) / name)
            upload_file(self.location.arrow_fs(), Path(tmp) / name, self.path(name))
        return name

    def best_start(self, cfg):
        """The latest stored stage `cfg` can start from (a `StageStart`): its weights, else its base, else its features."""
        from dcad.train.pipeline import StageStart

        weights = self.fetch("weights", cfg)
        if weights is not None:
            return StageStart(weights=weights)
        base = self.fetch("base", cfg)
        return StageStart(base=base) if base is not None else StageStart(features=self.fetch("features", cfg))
