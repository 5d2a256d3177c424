"""The benchmarked methods, all behind one interface (`base.Method`): fit(normal images) → predict(images)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from bench.methods.autoencoder import Autoencoder
from bench.methods.base import FitData, Method, MethodInfo
from bench.methods.drdc import DRDCMethod, ReverseDiffusion, SharedDRDC
from bench.methods.padim import PaDiM
from bench.methods.patchcore import PatchCore

METHOD_NAMES: tuple[str, ...] = (
    "drdc",
    "drdc_base_only",
    "drdc_refine_only",
    "reverse_diffusion",
    "patchcore",
    "padim",
    "autoencoder",
)


@dataclass(frozen=True)
class MethodOptions:
    autoencoder_iterations: int = 500
    reverse_steps: int = 50
    reverse_max_images: int | None = 24  # the reverse chain costs ~25× DRDC: evaluated on a subset
    drdc_model: Path | None = None  # a model directory trained on the same data, instead of training


def build_methods(names: list[str], options: MethodOptions) -> list[Method]:
    """Fresh, unfitted methods for one dataset; the DRDC-based ones share one trained model."""
    shared = SharedDRDC(options.drdc_model)
    factories = {
        "drdc": lambda: DRDCMethod(shared, "full"),
        "drdc_base_only": lambda: DRDCMethod(shared, "base_only"),
        "drdc_refine_only": lambda: DRDCMethod(shared, "refine_only"),
        "reverse_diffusion": lambda: ReverseDiffusion(shared, options.reverse_steps, options.reverse_max_images),
        "patchcore": PatchCore,
        "padim": PaDiM,
        "autoencoder": lambda: Autoencoder(iterations=options.autoencoder_iterations),
    }
    return [factories[name]() for name in names]


__all__ = ["METHOD_NAMES", "FitData", "Method", "MethodInfo", "MethodOptions", "build_methods"]
