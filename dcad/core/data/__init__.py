"""Datasets (MVTec AD, VisA, BTAD, folder), the synthetic benchmark, defects and the validation split.

Names are imported lazily, so `dcad data check|synth` do not pay for importing torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "CATEGORIES": "synth",
    "DEFECTS": "defects",
    "SUBTLE": "defects",
    "IMAGE_EXTENSIONS": "records",
    "LAYOUTS": "records",
    "AnomalyDataset": "dataset",
    "DatasetIndex": "records",
    "Record": "records",
    "Splits": "validation",
    "ValidationDataset": "validation",
    "build_splits": "validation",
    "check_dataset": "check",
    "load_image": "images",
    "load_mask": "images",
    "open_dataset": "records",
    "open_for_model": "records",
    "split_validation": "validation",
    "synthesize": "synth",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


if TYPE_CHECKING:  # for type checkers and IDEs
    from dcad.core.data.check import check_dataset  # noqa: F401
    from dcad.core.data.dataset import AnomalyDataset  # noqa: F401
    from dcad.core.data.defects import DEFECTS, SUBTLE  # noqa: F401
    from dcad.core.data.images import load_image, load_mask  # noqa: F401
    from dcad.core.data.records import IMAGE_EXTENSIONS, LAYOUTS, DatasetIndex, Record, open_dataset, open_for_model  # noqa: F401
    from dcad.core.data.synth import CATEGORIES, synthesize  # noqa: F401
    from dcad.core.data.validation import Splits, ValidationDataset, build_splits, split_validation  # noqa: F401
