"""Training stages that several trainings can share, and which config keys each stage depends on.

DRDC trains in order: backbone features of the training images (the feature cache) → base branch →
refiner → calibration. A config key belongs to the first stage it changes (`stage_of`): `data.*` and
`backbone.*` change everything from the features on; other base keys the base branch on; refiner keys
the refiner stage on; *rescore* keys (fusion, guidance, the inference timesteps, ablation) only how a
trained model is calibrated and scored. Two trainings whose configs agree on every key up to a stage
can share that stage's result, found by `fingerprint(cfg, stage)`:

- `FeatureCache` (`save_features`/`load_features`): the frozen backbone's features of the training set;
- `TrainedBase`: the base branch and the category prototypes (plus its per-epoch history);
- `TrainedWeights`: base, prototypes and denoiser, everything but the calibration, so a model with other
  rescore keys is built by loading them and calibrating on validation (`train_drdc(start=...)`).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from torch import Tensor

from dcad.core.config import DCADConfig
from dcad.core.errors import ModelError
from dcad.core.model.drdc import INFERENCE_KEYS
from dcad.train.checkpoint import save_checkpoint
from dcad.train.features import FeatureCache

Stage = Literal["features", "base", "refiner", "rescore"]
STAGES: tuple[Stage, ...] = ("features", "base", "refiner", "rescore")
FEATURE_KEYS = ("data.", "backbone.")
# The inference timesteps and fusion statistics are fitted by calibration; the refiner's weights never see them.
RESCORE_KEYS = (*INFERENCE_KEYS, "refiner.timesteps", "refiner.budget.", "refiner.compare", "refiner.compare_stages", "fusion.",
                "train.val_max_images")
REFINER_KEYS = ("refiner.", "train.refiner.", "train.validate_refiner")
IGNORED_KEYS = ("profile",)
FORMAT = 1


def _matches(key: str, prefixes: tuple[str, ...]) -> bool:
    return any(key == p or (p.endswith(".") and key.startswith(p)) for p in prefixes)


def stage_of(key: str) -> Stage:
    """The first training stage a dotted config key changes."""
    if _matches(key, FEATURE_KEYS):
        return "features"
    if _matches(key, RESCORE_KEYS):
        return "rescore"
    if _matches(key, REFINER_KEYS):
        return "refiner"
    return "base"


def fingerprint(cfg: DCADConfig, stage: Stage, dataset_digest: str = "") -> str:
    """A short digest of every key the result of `stage` depends on (and of the dataset)."""
    upto = STAGES.index(stage)
    flat = {k: v for k, v in cfg.flat().items() if not _matches(k, IGNORED_KEYS) and STAGES.index(stage_of(k)) <= upto}
    text = json.dumps({"stage": stage, "dataset": dataset_digest, "config": flat, "format": FORMAT}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def trained_stages(keys: list[str] | tuple[str, ...]) -> set[Stage]:
    """The stages a sweep over `keys` must train per trial (rescore keys train nothing)."""
    return {stage_of(k) for k in keys} - {"rescore"}


# ---- artifacts -----------------------------------------------------------------------------------------
@dataclass
class TrainedBase:
    """A trained base branch, the category prototypes and the feature cache it was trained on."""

    base: dict[str, Tensor] | None  # the transformer (None under `base.map: memory`)
    prototypes: Tensor
    features: FeatureCache
    history: list[dict] = field(default_factory=list)
    memory: dict[str, Tensor] | None = None  # the patch memory (`base.map: memory`)


@dataclass
class TrainedWeights:
    """Every trained weight of a model but its calibration: base, prototypes and denoiser (None: base only)."""

    base: dict[str, Tensor] | None
    prototypes: Tensor
    denoiser: dict[str, Tensor] | None
    history: list[dict] = field(default_factory=list)
    memory: dict[str, Tensor] | None = None

    @classmethod
    def of(cls, model, history: list[dict]) -> "TrainedWeights":
        denoiser = _cpu(model.denoiser.state_dict()) if model.denoiser is not None else None
        memory = _cpu(model.memory.state_dict()) if model.memory is not None else None
        base = _cpu(model.base.state_dict()) if model.base is not None else None
        return cls(base, model.prototypes.detach().cpu(), denoiser, list(history), memory)


def _cpu(state: dict[str, Tensor]) -> dict[str, Tensor]:
    return {k: v.detach().cpu() for k, v in state.items()}


def save_features(cache: FeatureCache, path: Path) -> Path:
    return _save(path, "features", {"features": cache.features, "category_index": cache.category_index,
                                    "categories": list(cache.categories)})


def load_features(path: Path) -> FeatureCache:
    state = _load(path, "features")
    return FeatureCache(state["features"], state["category_index"], list(state["categories"]))


def save_base(trained: TrainedBase, path: Path) -> Path:
    return _save(path, "base", {"base": _cpu(trained.base) if trained.base is not None else None, "prototypes": trained.prototypes.cpu(),
                                "features": trained.features.features, "category_index": trained.features.category_index,
                                "categories": list(trained.features.categories), "history": _jsonable(trained.history),
                                "memory": trained.memory})


def load_base(path: Path) -> TrainedBase:
    s = _load(path, "base")
    cache = FeatureCache(s["features"], s["category_index"], list(s["categories"]))
    return TrainedBase(s["base"], s["prototypes"], cache, json.loads(s["history"]), s.get("memory"))


def save_weights(trained: TrainedWeights, path: Path) -> Path:
    return _save(path, "weights", {"base": trained.base, "prototypes": trained.prototypes, "denoiser": trained.denoiser,
                                   "history": _jsonable(trained.history), "memory": trained.memory})


def load_weights(path: Path) -> TrainedWeights:
    s = _load(path, "weights")
    return TrainedWeights(s["base"], s["prototypes"], s["denoiser"], json.loads(s["history"]), s.get("memory"))


def _jsonable(history: list[dict]) -> str:
    return json.dumps(history, allow_nan=True, default=float)


def _save(path: Path, kind: str, payload: dict[str, Any]) -> Path:
    # save_checkpoint writes atomically; its required keys double as the artifact's header
    return save_checkpoint({"stage": kind, "epoch": 0, "model": payload, "optimizer": None, "scheduler": None,
                            "format": FORMAT}, path)


def _load(path: Path, kind: str) -> dict[str, Any]:
    from dcad.train.checkpoint import load_checkpoint

    state = load_checkpoint(path)
    if state.get("stage") != kind or state.get("format") != FORMAT:
        raise ModelError(f"{path}: not a shared {kind} stage (format {state.get('format')}, stage {state.get('stage')})")
    return state["model"]


def load_into(model, weights: TrainedWeights | TrainedBase) -> None:
    """Copy shared weights into a freshly built DRDC (strictly: shapes and names must match)."""
    if model.base is not None:
        if weights.base is None:
            raise ModelError("the shared stage holds no base transformer, which this config's base.map=reconstruction needs")
        model.base.load_state_dict(weights.base)
    model.prototypes.copy_(weights.prototypes.to(model.prototypes.device))
    denoiser = getattr(weights, "denoiser", None)
    if denoiser is not None and model.denoiser is not None:
        model.denoiser.load_state_dict(denoiser)
    if model.memory is not None:
        if weights.memory is None:
            raise ModelError("the shared stage holds no patch memory, which this config's base.map=memory needs")
        model.memory.load_state_dict(weights.memory)


__all__ = [
    "STAGES", "TrainedBase", "TrainedWeights", "fingerprint", "load_base", "load_features", "load_into",
    "load_weights", "save_base", "save_features", "save_weights", "stage_of", "trained_stages",
]
