"""Saving and loading resumable training states (plain tensors and Python values only)."""

from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from dcad.core.errors import ModelError, first_line

REQUIRED_KEYS = ("stage", "epoch", "model", "optimizer", "scheduler")


def save_checkpoint(state: dict[str, Any], path: str | Path) -> Path:
    """Write atomically: a temporary file next to `path`, then a rename (a crash never leaves half a file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a state written by `save_checkpoint` (weights-only unpickling); ModelError on anything else."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"{path}: checkpoint not found")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except (pickle.UnpicklingError, zipfile.BadZipFile, EOFError, RuntimeError, ValueError, OSError) as err:
        raise ModelError(f"{path}: not a readable dcad checkpoint ({first_line(err, 160)})") from None
    if not isinstance(state, dict) or any(key not in state for key in REQUIRED_KEYS):
        missing = [k for k in REQUIRED_KEYS if not isinstance(state, dict) or k not in state]
        raise ModelError(f"{path}: not a dcad training checkpoint (missing {', '.join(missing)})")
    return state
