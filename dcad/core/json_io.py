"""Strict JSON files: undefined metrics (NaN, ±inf) are written as null."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np


def json_safe(value: Any) -> Any:
    """NaN/inf become None and numpy scalars Python numbers, recursively through dicts, lists and tuples."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    return value


def write_json(path: str | Path, data: Any, *, atomic: bool = False) -> None:
    """`atomic`: through a temporary file next to `path` and a rename (a crash never leaves half a file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    target = path.with_suffix(".tmp") if atomic else path
    target.write_text(json.dumps(json_safe(data), indent=2, allow_nan=False))
    if atomic:
        os.replace(target, path)
