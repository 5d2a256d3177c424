"""One executor per step kind: `(resolved step spec, StepContext) -> outputs`."""

from __future__ import annotations

from typing import Callable

from dcad.platform.pipeline.steps.context import StepContext, StopPipeline
from dcad.platform.pipeline.steps.data import run_check, run_synth
from dcad.platform.pipeline.steps.models import run_evaluate, run_promote, run_register
from dcad.platform.pipeline.steps.sweep import run_sweep_step
from dcad.platform.pipeline.steps.train import run_train

EXECUTORS: dict[str, Callable] = {
    "synth": run_synth,
    "check": run_check,
    "train": run_train,
    "sweep": run_sweep_step,
    "evaluate": run_evaluate,
    "register": run_register,
    "promote": run_promote,
}

__all__ = ["EXECUTORS", "StepContext", "StopPipeline"]
