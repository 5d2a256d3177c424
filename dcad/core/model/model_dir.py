"""The self-contained model directory: what `dcad train` writes and `dcad eval/predict` load.

Layout (diffusers-style `save_pretrained`/`from_pretrained`):
    dcad_model.json     format marker, format version, dcad version, categories, thresholds, provenance
    config.yaml         the full DCADConfig
    model.safetensors   every tensor: backbone, base branch, denoiser, prototypes, calibration
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import warnings
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from dcad import __version__
from dcad.core.config import ConfigError, DCADConfig
from dcad.core.errors import ModelError
from dcad.core.model.drdc import DRDC

FORMAT = "dcad-model"
FORMAT_VERSION = 1
META_FILE = "dcad_model.json"
CONFIG_FILE = "config.yaml"
WEIGHTS_FILE = "model.safetensors"


def save_model(model: DRDC, directory: str | Path, extra: dict[str, Any] | None = None) -> Path:
    """Write the model directory atomically (a temp dir renamed into place)."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(tmp / WEIGHTS_FILE))
        (tmp / CONFIG_FILE).write_text(model.cfg.to_yaml())
        (tmp / META_FILE).write_text(json.dumps(_metadata(model, extra), indent=2))
        _replace_dir(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def _metadata(model: DRDC, extra: dict[str, Any] | None) -> dict[str, Any]:
    cal = model.calibration
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "dcad_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "categories": model.categories,
        "image_size": model.image_size,
        "image_threshold": float(cal.image_threshold),
        "pixel_threshold": float(cal.pixel_threshold),
        "backbone_weights": getattr(model.backbone, "weights_source", "unknown"),
        **(extra or {}),
    }


def _replace_dir(src: Path, dst: Path) -> None:
    """Move src to dst; keep files of dst that are not part of the model (e.g. checkpoints, plots)."""
    dst.mkdir(parents=True, exist_ok=True)
    for item in src.iterdir():
        os.replace(item, dst / item.name)
    src.rmdir()


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
    if version != FORMAT_VERSION:
        raise ModelError(
            f"{directory}: model format version {version} is not supported by dcad {__version__} "
            f"(expects {FORMAT_VERSION}); retrain or use the dcad version that wrote it ({meta.get('dcad_version')})"
        )
    return meta


def load_model(directory: str | Path, device: str | torch.device = "cpu") -> DRDC:
    directory = Path(directory)
    meta = read_metadata(directory)
    try:
        cfg = DCADConfig.from_yaml(directory / CONFIG_FILE)
    except ConfigError as err:
        raise ModelError(f"{directory}: incompatible config ({err})") from None
    weights_path = directory / WEIGHTS_FILE
    if not weights_path.is_file():
        raise ModelError(f"{directory}: missing {WEIGHTS_FILE}")
    # Every tensor, the backbone's included, comes from the directory: no weight resolution needed.
    cfg_no_download = cfg.model_copy(deep=True)
    cfg_no_download.backbone.weights = "none"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = DRDC(cfg_no_download, meta["categories"])
    model.cfg = cfg
    try:
        state = load_file(str(weights_path))
    except Exception as err:  # safetensors raises its own error types
        raise ModelError(f"{weights_path}: unreadable weights ({err})") from None
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as err:  # shape mismatches raise even with strict=False
        mismatch = next((line.strip() for line in str(err).splitlines() if "size mismatch" in line), str(err).splitlines()[0])
        raise ModelError(f"{directory}: weights do not match the config ({mismatch})") from None
    if missing or unexpected:
        raise ModelError(
            f"{directory}: weights do not match the config "
            f"(missing {len(missing)} e.g. {missing[:2]}, unexpected {len(unexpected)} e.g. {unexpected[:2]})"
        )
    model.backbone.weights_source = meta.get("backbone_weights", "model directory")
    return model.to(device).eval()
