"""Read a YAML file whose top level must be a mapping, with one-line errors naming the file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from dcad.core.errors import DcadError, first_line


def read_yaml_mapping(path: str | Path, what: str, error: type[DcadError] = DcadError, hint: str = "") -> dict[str, Any]:
    """The mapping at the top of `path`; `error(...)` naming `path` and `what` if unreadable or not a mapping."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as err:
        raise error(f"{path}: cannot read {what} ({err.strerror})") from None
    except yaml.YAMLError as err:
        raise error(f"{path}: not valid YAML ({first_line(err)})") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise error(f"{path}: top level must be a mapping{hint}")
    return data
