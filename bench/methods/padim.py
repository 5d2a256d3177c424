"""PaDiM (Defard et al. 2021) on the project's backbone: a Gaussian per feature position (on a random
subset of channels) per category; the anomaly score of a position is its Mahalanobis distance."""

from __future__ import annotations

import torch
from torch import Tensor

from bench.methods.base import FitData, MethodInfo, backbone_features, by_category, upsample
from dcad.core.model.backbone import FeatureExtractor
from dcad.core.model.fusion import gaussian_blur


class Gaussians:
    """Mean [L,d] and inverse covariance [L,d,d] of L positions, from features [N,d,h,w]."""

    def __init__(self, feats: Tensor, ridge: float) -> None:
        n, d = feats.shape[:2]
        x = feats.flatten(2).permute(2, 0, 1).double()  # [L,N,d]
        self.mean = x.mean(dim=1)
        centred = x - self.mean[:, None]
        cov = centred.transpose(1, 2) @ centred / max(n - 1, 1) + ridge * torch.eye(d, dtype=torch.float64)
        self.inv_cov = torch.linalg.inv(cov).float()
        self.mean = self.mean.float()

    def mahalanobis(self, feats: Tensor) -> Tensor:
        """[B,d,h,w] → [B,h,w]."""
        b, d, h, w = feats.shape
        delta = feats.flatten(2).permute(2, 0, 1) - self.mean[:, None]  # [L,B,d]
        dist = torch.einsum("lbi,lij,lbj->lb", delta, self.inv_cov, delta).clamp_min(0).sqrt()
        return dist.T.reshape(b, h, w)


class PaDiM:
    name = "padim"
    info = MethodInfo("Gaussian per position on a random channel subset, Mahalanobis distance",
                      multi_class=False, note="one set of Gaussians per category")
    batch_size = 32

    def __init__(self, channels: int = 100, ridge: float = 0.01, blur_sigma: float = 4.0) -> None:
        self.channels, self.ridge, self.blur_sigma = channels, ridge, blur_sigma
        self.gaussians: dict[str, Gaussians] = {}

    def fit(self, data: FitData) -> None:
        self.size = data.cfg.data.image_size
        self.extractor = FeatureExtractor(data.cfg.backbone, self.size)
        total = self.extractor.channels
        gen = torch.Generator().manual_seed(data.seed)
        self.subset = torch.randperm(total, generator=gen)[: min(self.channels, total)].sort().values
        feats = backbone_features(self.extractor, data.images)[:, self.subset]
        for category, rows in by_category(data.categories).items():
            self.gaussians[category] = Gaussians(feats[rows], self.ridge)

    @torch.no_grad()
    def predict(self, images: Tensor, categories: list[str]) -> tuple[Tensor, Tensor]:
        feats = backbone_features(self.extractor, images)[:, self.subset]
        patch_scores = torch.empty(feats.shape[0], *feats.shape[-2:])
        for category, rows in by_category(categories).items():
            patch_scores[rows] = self.gaussians[category].mahalanobis(feats[rows])
        maps = gaussian_blur(upsample(patch_scores, self.size), self.blur_sigma)
        return patch_scores.flatten(1).amax(dim=1), maps
