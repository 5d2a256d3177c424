"""The base stage: train the transformer reconstructor on cached backbone features (MSE)."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dcad.core.model.base_branch import BaseReconstructor
from dcad.train.features import FeatureCache


class BaseStage:
    """`TrainStage` of the base branch; batches are float32 feature tensors [B,C,h,w] from a `FeatureCache`."""

    name = "base"

    def __init__(
        self,
        model: BaseReconstructor,
        cache: FeatureCache,
        validate_fn: Callable[[nn.Module], dict[str, float]] | None = None,
    ) -> None:
        self.model = model
        self.cache = cache
        self.validate_fn = validate_fn

    def module(self) -> nn.Module:
        return self.model

    def dataset(self) -> FeatureCache:
        return self.cache

    def loss(self, module: nn.Module, batch: Tensor, generator: torch.Generator) -> Tensor:
        """The clean features against the reconstruction of their jittered version: MSE (``base.distance=l2``)
        or the mean per-stage cosine distance (``cosine``, the distance the base map then shows)."""
        recon = module(batch, generator)
        if self.model.distance == "cosine":
            return self.model.token_error(batch, recon).mean()
        return F.mse_loss(recon.float(), batch.float())

    def validate(self, module: nn.Module) -> dict[str, float]:
        return self.validate_fn(module) if self.validate_fn is not None else {}
