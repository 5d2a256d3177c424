"""PatchCore (Roth et al. 2022) on the project's backbone: a memory bank of locally aggregated patch
features per category, subsampled by greedy (k-center) coreset selection, scored by the distance of
each test patch to its nearest bank entry.

The coreset exists to make the search affordable on banks of ~10^5 patches (the paper's 1–10 %); it
never shrinks a bank below `min_bank` patches, so a small training set (the benchmark's 32 images ×
64 patches per category) keeps its whole bank instead of a tenth of it."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from bench.methods.base import FitData, MethodInfo, backbone_features, by_category, upsample
from dcad.core.model.backbone import FeatureExtractor
from dcad.core.model.fusion import gaussian_blur

PROJECTION_DIM = 128  # coreset distances are computed on a random projection (as in the paper)


def greedy_coreset(points: Tensor, ratio: float, seed: int) -> Tensor:
    """Indices of round(ratio·N) points (at least 1) chosen by farthest-point (k-center greedy) selection."""
    n = points.shape[0]
    k = min(n, max(1, round(ratio * n)))
    gen = torch.Generator().manual_seed(seed)
    if points.shape[1] > PROJECTION_DIM:
        projection = torch.randn(points.shape[1], PROJECTION_DIM, generator=gen) / math.sqrt(PROJECTION_DIM)
        points = points @ projection
    chosen = [int(torch.randint(n, (1,), generator=gen))]
    nearest = torch.cdist(points, points[chosen[0]][None]).squeeze(1)
    for _ in range(k - 1):
        index = int(nearest.argmax())
        chosen.append(index)
        nearest = torch.minimum(nearest, torch.cdist(points, points[index][None]).squeeze(1))
    return torch.tensor(chosen)


def patch_features(extractor: FeatureExtractor, images: Tensor) -> Tensor:
    """[N,C,h,w] features with 3×3 local average aggregation (PatchCore's neighbourhood)."""
    feats = backbone_features(extractor, images)
    return F.avg_pool2d(feats, 3, stride=1, padding=1, count_include_pad=False)


class PatchCore:
    name = "patchcore"
    info = MethodInfo("memory bank of patch features (10 % greedy coreset above 10k patches), nearest-neighbour "
                      "distance", multi_class=False, note="one bank per category")
    batch_size = 32

    def __init__(self, coreset_ratio: float = 0.1, min_bank: int = 10_000, blur_sigma: float = 4.0) -> None:
        self.coreset_ratio, self.min_bank, self.blur_sigma = coreset_ratio, min_bank, blur_sigma
        self.banks: dict[str, Tensor] = {}

    def subsample(self, patches: Tensor, seed: int) -> Tensor:
        """The bank: all patches up to `min_bank`, else a greedy coreset of max(ratio·N, min_bank) of them."""
        n = patches.shape[0]
        if n <= self.min_bank:
            return patches
        return patches[greedy_coreset(patches, max(self.coreset_ratio, self.min_bank / n), seed)]

    def fit(self, data: FitData) -> None:
        self.size = data.cfg.data.image_size
        self.extractor = FeatureExtractor(data.cfg.backbone, self.size)
        feats = patch_features(self.extractor, data.images)
        for category, rows in by_category(data.categories).items():
            patches = feats[rows].permute(0, 2, 3, 1).reshape(-1, feats.shape[1])
            self.banks[category] = self.subsample(patches, data.seed)

    @torch.no_grad()
    def predict(self, images: Tensor, categories: list[str]) -> tuple[Tensor, Tensor]:
        feats = patch_features(self.extractor, images)
        b, c, h, w = feats.shape
        patch_scores = torch.empty(b, h, w)
        for category, rows in by_category(categories).items():
            patches = feats[rows].permute(0, 2, 3, 1).reshape(-1, c)
            nearest = torch.cdist(patches, self.banks[category]).amin(dim=1)
            patch_scores[rows] = nearest.reshape(len(rows), h, w)
        maps = gaussian_blur(upsample(patch_scores, self.size), self.blur_sigma)
        return patch_scores.flatten(1).amax(dim=1), maps
