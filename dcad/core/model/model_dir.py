"""The self-contained model directory: what `dcad train` writes and `dcad eval/predict` load.

Layout (format 2, diffusers-style: one folder per component, its config next to its weights):
    dcad_model.json                 format marker and version, dcad version, categories, thresholds, provenance
    config.yaml                     the full DCADConfig (provenance; `model.cfg`)
    <component>/config.json         backbone, base, prototypes, calibration, memory (`base.map: memory`), denoiser
                                    (with a refiner)
    <component>/model.safetensors   that component's tensors, loaded strictly
    scheduler/scheduler_config.json the noise schedule (diffusers `save_config`; with a refiner)
Format 1 (one `model.safetensors` beside config.yaml and dcad_model.json) still loads.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from dcad import __version__
from dcad.core.clock import now_utc
from dcad.core.config import ConfigError, DCADConfig
from dcad.core.errors import ModelError
from dcad.core.model.drdc import DRDC, Calibration
from dcad.core.model.noise import load_scheduler

FORMAT = "dcad-model"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
META_FILE = "dcad_model.json"
CONFIG_FILE = "config.yaml"
WEIGHTS_FILE = "model.safetensors"  # of each component (format 1: of the whole model)
COMPONENT_CONFIG = "config.json"
SCHEDULER_DIR = "scheduler"


class _Prototypes(nn.Module):
    """The category prototypes as a component: its buffer is `DRDC.prototypes` itself (loading copies in place)."""

    def __init__(self, model: DRDC) -> None:
        super().__init__()
        self.register_buffer("prototypes", model.prototypes)


def components(model: DRDC) -> dict[str, tuple[nn.Module, dict[str, Any]]]:
    """Each component of `model` with the config it is built from (what its `config.json` holds)."""
    cfg, k = model.cfg, len(model.categories)
    out = {
        "backbone": (model.backbone, {**cfg.backbone.model_dump(mode="json", exclude={"weights"}), "image_size": model.image_size}),
        "prototypes": (_Prototypes(model), {"num_categories": k, "channels": model.backbone.channels}),
        "calibration": (model.calibration, {"num_categories": k, "timesteps": cfg.refiner.timesteps,
                                            "patch_sizes": cfg.refiner.patch_sizes, "stats": cfg.fusion.stats,
                                            "map_size": model.image_size}),
    }
    if model.base is not None:
        out["base"] = (model.base, {**cfg.base.model_dump(mode="json"), "in_channels": model.backbone.channels})
    if model.memory is not None:
        out["memory"] = (model.memory, {**cfg.base.memory.model_dump(mode="json"), "channels": model.memory.channels,
                                        "image_size": model.image_size})
    if model.denoiser is not None:
        keys = {"unet", "class_conditioning", "test_time_conditioning", "base_map_channel", "space_to_depth"}
        out["denoiser"] = (model.denoiser, {**cfg.refiner.model_dump(mode="json", include=keys), "num_categories": k})
    return out


# ---- save ------------------------------------------------------------------------------------------------
def save_model(model: DRDC, directory: str | Path, extra: dict[str, Any] | None = None) -> Path:
    """Write the model directory: a temporary sibling is filled, then renamed into place.

    Files of an existing `directory` that are not part of the model (checkpoints, reports) move along; readers
    see the old model or the new one, never a mix (between the two renames the path is briefly absent)."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        for name, (module, config) in components(model).items():
            (tmp / name).mkdir()
            (tmp / name / COMPONENT_CONFIG).write_text(json.dumps(config, indent=2))
            save_file({k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}, str(tmp / name / WEIGHTS_FILE))
        if model.scheduler is not None:
            model.scheduler.save_config(tmp / SCHEDULER_DIR)
        (tmp / CONFIG_FILE).write_text(model.cfg.to_yaml())
        (tmp / META_FILE).write_text(json.dumps(_metadata(model, extra), indent=2))
        _swap_in(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def _metadata(model: DRDC, extra: dict[str, Any] | None) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "dcad_version": __version__,
        "created": now_utc(),
        "categories": model.categories,
        "image_size": model.image_size,
        **{name: float(getattr(model.calibration, name)) for name in Calibration.THRESHOLDS},
        "backbone_weights": getattr(model.backbone, "weights_source", "unknown"),
        **(extra or {}),
    }


_MODEL_ENTRIES = {META_FILE, CONFIG_FILE, WEIGHTS_FILE, SCHEDULER_DIR, "backbone", "base", "prototypes", "calibration",
                  "memory", "denoiser"}


def _swap_in(new: Path, directory: Path) -> None:
    """Rename `new` to `directory`; entries of an old `directory` that are not model files then move into it
    (the old directory is deleted only once they all have)."""
    if not directory.exists():
        os.replace(new, directory)
        return
    old = directory.with_name(f"{new.name}.old")
    os.replace(directory, old)
    os.replace(new, directory)
    for item in old.iterdir():
        if item.name not in _MODEL_ENTRIES:
            os.replace(item, directory / item.name)
    shutil.rmtree(old)


# ---- load ------------------------------------------------------------------------------------------------
def read_metadata(directory: str | Path) -> dict[str, Any]:
    directory = Path(directory)
    if not directory.exists():
        raise ModelError(f"{directory}: model directory does not exist")
    if not directory.is_dir():
        raise ModelError(f"{directory}: not a directory (expected a dcad model directory)")
    meta_path = directory / META_FILE
    if not meta_path.is_file():
        raise ModelError(f"{directory}: not a dcad model directory (no {META_FILE})")
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ModelError(f"{meta_path}: unreadable model metadata ({err})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ModelError(f"{meta_path}: not a dcad model (format is {meta.get('format')!r})")
    version = meta.get("format_version")
    if version not in READABLE_VERSIONS:
        raise ModelError(
            f"{directory}: model format version {version} is not supported by dcad {__version__} "
            f"(reads {', '.join(map(str, READABLE_VERSIONS))}); retrain or use the dcad version that wrote it "
            f"({meta.get('dcad_version')})"
        )
    return meta


def load_model(directory: str | Path, device: str | torch.device = "cpu") -> DRDC:
    directory = Path(directory)
    meta = read_metadata(directory)
    try:
        cfg = DCADConfig.from_yaml(directory / CONFIG_FILE)
    except ConfigError as err:
        raise ModelError(f"{directory}: incompatible config ({err})") from None
    # Every tensor, the backbone's included, comes from the directory: no weight resolution needed.
    cfg_no_download = cfg.model_copy(deep=True)
    cfg_no_download.backbone.weights = "none"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = DRDC(cfg_no_download, meta["categories"])
    model.cfg = cfg
    parts = components(model)
    states = _format1_states(directory, model) if meta["format_version"] == 1 else _component_states(directory, parts)
    for name, (module, _) in parts.items():
        try:
            module.load_state_dict(states.pop(name, {}), strict=True)
        except RuntimeError as err:
            reason = " ".join(str(err).split())
            raise ModelError(f"{directory}: weights do not match the config ({name}: {reason[:300]})") from None
    if states:
        raise ModelError(f"{directory}: weights do not match the config (unexpected components {sorted(states)})")
    if model.scheduler is not None and meta["format_version"] > 1:
        model.scheduler = _stored_scheduler(directory, model.scheduler)
    for name in Calibration.THRESHOLDS:
        getattr(model.calibration, name).fill_(float(meta[name]))
    model.backbone.weights_source = meta.get("backbone_weights", "model directory")
    return model.to(device).eval()


def _read_weights(path: Path) -> dict[str, Tensor]:
    if not path.is_file():
        raise ModelError(f"{path.parent}: missing {path.name}")
    try:
        return load_file(str(path))
    except Exception as err:  # safetensors raises its own error types
        raise ModelError(f"{path}: unreadable weights ({err})") from None


def _component_states(directory: Path, parts: dict[str, tuple[nn.Module, dict]]) -> dict[str, dict[str, Tensor]]:
    """Each component's tensors, after its stored config is checked against the one `config.yaml` builds."""
    states = {}
    for name, (_, config) in parts.items():
        try:
            stored = json.loads((directory / name / COMPONENT_CONFIG).read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise ModelError(f"{directory}: component {name} has no readable {COMPONENT_CONFIG} ({err})") from None
        differing = sorted(k for k in stored.keys() | config.keys() if stored.get(k) != config.get(k))
        if differing:
            key = differing[0]
            raise ModelError(f"{directory}: weights do not match the config ({name}.{key} is {stored.get(key)!r} in "
                             f"{name}/{COMPONENT_CONFIG}, {config.get(key)!r} in {CONFIG_FILE})")
        states[name] = _read_weights(directory / name / WEIGHTS_FILE)
    return states


def _format1_states(directory: Path, model: DRDC) -> dict[str, dict[str, Tensor]]:
    """The one state dict of a format-1 directory, split into components (thresholds come from the metadata)."""
    states: dict[str, dict[str, Tensor]] = {}
    for key, value in _read_weights(directory / WEIGHTS_FILE).items():
        name, _, rest = key.partition(".")
        if key == "prototypes":
            name, rest = "prototypes", "prototypes"
        if name == "calibration" and rest in Calibration.THRESHOLDS:
            continue
        states.setdefault(name, {})[rest] = value
    calibration = states.setdefault("calibration", {})
    calibration.setdefault("refine_skip_score", torch.tensor(float("-inf")))  # written before the cascade existed
    rows = model.calibration.refine.mean.shape[0]
    for key in ("refine.mean", "refine.std", "refine.count"):  # categories without validation images: pooled row
        value = calibration.get(key)
        if value is not None and 0 < value.shape[0] < rows:
            calibration[key] = torch.cat([value[:-1], value[-1:].expand(rows - value.shape[0] + 1, *value.shape[1:])])
    return states


def _stored_scheduler(directory: Path, built: Any) -> Any:
    try:
        stored = load_scheduler(directory / SCHEDULER_DIR)
    except (OSError, json.JSONDecodeError, KeyError) as err:
        raise ModelError(f"{directory}: no readable {SCHEDULER_DIR}/scheduler_config.json ({err})") from None
    public = lambda s: {k: v for k, v in s.config.items() if not k.startswith("_")}  # noqa: E731
    if type(stored) is not type(built) or public(stored) != public(built):
        raise ModelError(f"{directory}: weights do not match the config ({SCHEDULER_DIR}/scheduler_config.json "
                         f"differs from refiner.scheduler in {CONFIG_FILE})")
    return stored
