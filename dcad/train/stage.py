"""The contract between a training stage (what is learned) and the loop (how it is learned).

DRDC trains in two stages: the base branch (transformer feature reconstruction, on cached
backbone features) and the refiner (conditional diffusion inpainting, on image crops). Both run
through the same loop in `dcad.train.loop`, which owns optimisation, schedules, clipping, mixed
precision, seeding, checkpoints and resume; a distributed runner calls the same loop on each worker.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Protocol

import torch
from torch import nn


class TrainStage(Protocol):
    """One trainable part of the model and how to compute its loss."""

    name: str  # "base" or "refiner"

    def module(self) -> nn.Module:
        """The parameters that are optimised and checkpointed (may be wrapped in DDP by a runner)."""

    def dataset(self) -> torch.utils.data.Dataset:
        """Training samples; the loop builds (distributed) samplers and loaders from it."""

    def loss(self, module: nn.Module, batch: Any, generator: torch.Generator) -> torch.Tensor:
        """Scalar training loss of one batch; `module` is `self.module()` or its DDP wrapper.

        All randomness (noise, masks, timesteps, jitter) comes from `generator`, so that an epoch is
        reproducible from (seed, epoch) alone and resume gives the same weights.
        """

    def validate(self, module: nn.Module) -> dict[str, float]:
        """Metrics on the validation split at the end of an epoch (may be empty)."""


@dataclass
class EpochReport:
    stage: str
    epoch: int  # 1-based, epochs completed so far
    epochs: int
    metrics: dict[str, float]
    checkpoint: Callable[[], dict[str, Any]]  # builds the full resumable state on demand
    extra: dict[str, Any] = field(default_factory=dict)


EpochCallback = Callable[[EpochReport], None]
StepCallback = Callable[[int, int, float], None]  # (epoch, step, loss), e.g. for progress bars


def batches_forever(loader: Iterable) -> Iterable:
    while True:
        yield from loader
