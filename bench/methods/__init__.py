"""The benchmarked methods, all behind one interface (`base.Method`): fit(normal images) → predict(images)."""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.methods.autoencoder import Autoencoder
from bench.methods.base import FitData, Method, MethodInfo
from bench.methods.drdc import REFINE_ALL, DRDCMethod, ReverseDiffusion, SharedDRDC, budget_methods
from dcad.core.errors import DcadError

METHOD_NAMES: tuple[str, ...] = (
    "drdc",
    "drdc_base_only",
    "drdc_refine_only",
    "drdc_refine_all",
    "drdc_windows2",
    "drdc_window64",
    "drdc_cascade",
    "reverse_diffusion",
    "autoencoder",
    "anomalib_padim",
    "anomalib_patchcore",
    "anomalib_stfpm",
)
ANOMALIB_CLASSES = {"anomalib_padim": "AnomalibPadim", "anomalib_patchcore": "AnomalibPatchcore",
                    "anomalib_stfpm": "AnomalibStfpm"}


@dataclass(frozen=True)
class MethodOptions:
    autoencoder_iterations: int = 500
    reverse_steps: int = 50
    reverse_max_images: int | None = 24  # the reverse chain takes ~130× DRDC's time: evaluated on a subset
    drdc_model: Path | None = None  # a model directory trained on the same data, instead of training
    stfpm_iterations: int = 100  # anomalib_stfpm's student training budget (batch 16)


def anomalib_method(name: str, **kwargs: Any) -> Method:
    """One of anomalib's models (`bench.methods.anomalib_models`), importing anomalib only now."""
    try:
        anomalib_models = importlib.import_module("bench.methods.anomalib_models")
    except ModuleNotFoundError as err:
        raise DcadError(f"method {name} needs the package '{(err.name or 'anomalib').split('.')[0]}' (anomalib 2.x): "
                        "pip install 'anomalib>=2.7,<3' (or pip install -e '.[bench]')") from None
    return getattr(anomalib_models, ANOMALIB_CLASSES[name])(**kwargs)


def build_methods(names: list[str], options: MethodOptions) -> list[Method]:
    """Fresh, unfitted methods for one dataset; the DRDC-based ones share one trained model."""
    shared = SharedDRDC(options.drdc_model)
    factories = {
        "drdc": lambda: DRDCMethod(shared, "full"),
        "drdc_base_only": lambda: DRDCMethod(shared, "base_only"),
        "drdc_refine_only": lambda: DRDCMethod(shared, "refine_only", REFINE_ALL),
        **budget_methods(shared),
        "reverse_diffusion": lambda: ReverseDiffusion(shared, options.reverse_steps, options.reverse_max_images),
        "autoencoder": lambda: Autoencoder(iterations=options.autoencoder_iterations),
        "anomalib_padim": lambda: anomalib_method("anomalib_padim"),
        "anomalib_patchcore": lambda: anomalib_method("anomalib_patchcore"),
        "anomalib_stfpm": lambda: anomalib_method("anomalib_stfpm", iterations=options.stfpm_iterations),
    }
    return [factories[name]() for name in names]


__all__ = ["METHOD_NAMES", "FitData", "Method", "MethodInfo", "MethodOptions", "build_methods"]
