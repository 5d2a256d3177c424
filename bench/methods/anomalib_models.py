"""anomalib 2.x's own PaDiM, PatchCore and STFPM as reference baselines, on the project's backbone, images
and leak-free protocol.

anomalib's torch models are used directly, not its `Engine`: the Engine's default validation split is the
test split, and its post-processing normalises scores with minima, maxima and thresholds taken from it.
Here each model is fitted on a category's normal training images (`FitData`, validation held out) the way
anomalib's Lightning modules fit it, and scored with its RAW outputs: `pred_score` and `anomaly_map` of
its `InferenceBatch`, before any normalisation or thresholding. One model per category.

- `anomalib_padim`: `PadimModel`, embeddings of every training image, then `fit()` (a Gaussian per
  position); 100 random channels.
- `anomalib_patchcore`: `PatchcoreModel`, embeddings of every training image, then anomalib's k-center
  greedy coreset at its default ratio 0.1 (`Patchcore(coreset_sampling_ratio=0.1)`); the image score is
  anomalib's re-weighted nearest-neighbour distance (`num_neighbors=9`).
- `anomalib_stfpm`: `STFPMModel`, the student trained with `STFPMLoss` on the normal training images for a
  fixed budget (`iterations`, batch 16) with anomalib's optimizer (SGD lr 0.4, momentum 0.9, weight decay
  1e-3); no early stopping (anomalib's examples stop on a test-split metric).

Differences from anomalib's defaults, all to share the other methods' set-up: the profile's backbone
(`cfg.backbone`, weights resolved offline by dcad, see `anomalib_backbone`) at its `out_indices` for
all three models (STFPM's resnet18 default `layer1..3` are its stride-4/8/16 stages, which `out_indices`
[1, 2, 3] are for EfficientNet-Lite0 too); images at the profile's size (anomalib resizes to 256) and
normalised with the backbone's own mean and std, exactly as dcad's `FeatureExtractor` does. Each fit
asserts that the loaded backbone equals dcad's, tensor for tensor.
"""

from __future__ import annotations

import contextlib
import io
import logging
import random
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from bench.methods.anomalib_backbone import WEIGHTS_CACHE, check_same_weights, local_backbone
from bench.methods.base import FitData, MethodInfo, by_category
from dcad.core.model.backbone import FeatureExtractor

with warnings.catch_warnings():  # anomalib's package imports warn about its own deprecated modules
    warnings.simplefilter("ignore", FutureWarning)
    from anomalib.models.image.padim.torch_model import PadimModel
    from anomalib.models.image.patchcore.torch_model import PatchcoreModel
    from anomalib.models.image.stfpm.loss import STFPMLoss
    from anomalib.models.image.stfpm.torch_model import STFPMModel


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """anomalib draws from the global torch, numpy and random generators: seed them, then restore them."""
    np_state, py_state = np.random.get_state(), random.getstate()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        np.random.seed(seed)
        random.seed(seed)
        try:
            yield
        finally:
            np.random.set_state(np_state)
            random.setstate(py_state)


@contextlib.contextmanager
def quiet_timm() -> Iterator[None]:
    """Hide timm's note about the classifier keys a feature model skips (the weights are checked instead)."""
    logger = logging.getLogger("timm")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


class AnomalibMethod:
    """Shared set-up: one anomalib torch model per category on dcad's backbone; raw scores and maps."""

    name = ""
    info = MethodInfo("", multi_class=False)
    batch_size = 32

    def __init__(self, weights_cache: Path = WEIGHTS_CACHE) -> None:
        self.weights_cache = Path(weights_cache)
        self.models: dict[str, nn.Module] = {}

    def build(self, backbone: str, layers: list[int]) -> nn.Module:
        raise NotImplementedError

    def fit_model(self, model: nn.Module, images: Tensor, seed: int) -> None:
        raise NotImplementedError

    @staticmethod
    def backbone_of(model: nn.Module) -> nn.Module:
        """The timm feature model whose weights must equal dcad's."""
        return model.feature_extractor.feature_extractor

    def fit(self, data: FitData) -> None:
        reference = FeatureExtractor(data.cfg.backbone, data.cfg.data.image_size)
        self.mean, self.std = reference.mean, reference.std
        backbone, layers = local_backbone(data.cfg.backbone, self.weights_cache), list(data.cfg.backbone.out_indices)
        self.models = {}
        for category, rows in by_category(data.categories).items():
            with seeded(data.seed):
                with quiet_timm():
                    model = self.build(backbone, layers)
                check_same_weights(self.backbone_of(model), reference.model, f"{self.name} ({category})")
                self.fit_model(model, self.normalise(data.images[rows]), data.seed)
            self.models[category] = model.eval()

    def normalise(self, images: Tensor) -> Tensor:
        return (images.float() - self.mean) / self.std

    @torch.no_grad()
    def predict(self, images: Tensor, categories: list[str]) -> tuple[Tensor, Tensor]:
        x = self.normalise(images)
        scores, maps = torch.empty(len(x)), torch.empty(len(x), *x.shape[-2:])
        for category, rows in by_category(categories).items():
            out = self.models[category](x[rows])
            scores[rows] = out.pred_score.reshape(-1).float()
            maps[rows] = out.anomaly_map.reshape(len(rows), *x.shape[-2:]).float()
        return scores, maps


def batches(images: Tensor, size: int = 32) -> Iterator[Tensor]:
    return (images[i : i + size] for i in range(0, len(images), size))


@torch.no_grad()
def collect_embeddings(model: nn.Module, images: Tensor) -> None:
    """A memory-bank model in training mode stores the embeddings of every image it sees."""
    model.train()
    for batch in batches(images):
        model(batch)


class AnomalibPadim(AnomalibMethod):
    name = "anomalib_padim"
    info = MethodInfo("anomalib 2.x PadimModel (its torch model, raw scores), 100 random channels",
                      multi_class=False, note="one model per category; anomalib's Gaussian fit")

    def __init__(self, n_features: int = 100, weights_cache: Path = WEIGHTS_CACHE) -> None:
        super().__init__(weights_cache)
        self.n_features = n_features

    def build(self, backbone: str, layers: list[int]) -> nn.Module:
        return PadimModel(backbone=backbone, layers=layers, pre_trained=True, n_features=self.n_features)

    @torch.no_grad()
    def fit_model(self, model: nn.Module, images: Tensor, seed: int) -> None:
        collect_embeddings(model, images)
        model.fit()


class AnomalibPatchcore(AnomalibMethod):
    name = "anomalib_patchcore"
    info = MethodInfo("anomalib 2.x PatchcoreModel (its torch model, raw scores), 10 % k-center coreset",
                      multi_class=False, note="one bank per category; anomalib's default coreset ratio 0.1")

    def __init__(self, coreset_ratio: float = 0.1, num_neighbors: int = 9, weights_cache: Path = WEIGHTS_CACHE) -> None:
        super().__init__(weights_cache)
        self.coreset_ratio, self.num_neighbors = coreset_ratio, num_neighbors

    def build(self, backbone: str, layers: list[int]) -> nn.Module:
        return PatchcoreModel(layers=layers, backbone=backbone, pre_trained=True, num_neighbors=self.num_neighbors)

    @torch.no_grad()
    def fit_model(self, model: nn.Module, images: Tensor, seed: int) -> None:
        collect_embeddings(model, images)
        with contextlib.redirect_stderr(io.StringIO()), warnings.catch_warnings():  # its progress bar, and a
            warnings.simplefilter("ignore", DeprecationWarning)  # warning about an argument not passed here
            model.subsample_embedding(self.coreset_ratio)


class AnomalibStfpm(AnomalibMethod):
    name = "anomalib_stfpm"
    batch_size = 32

    def __init__(self, iterations: int = 100, train_batch: int = 16, weights_cache: Path = WEIGHTS_CACHE) -> None:
        super().__init__(weights_cache)
        self.iterations, self.train_batch = iterations, train_batch
        self.info = MethodInfo(
            f"anomalib 2.x STFPMModel (its torch model, raw scores), student trained {iterations} iterations",
            multi_class=False, note=f"one student per category; STFPMLoss, batch {train_batch}, SGD lr 0.4")

    def build(self, backbone: str, layers: list[int]) -> nn.Module:
        return STFPMModel(layers=layers, backbone=backbone)

    @staticmethod
    def backbone_of(model: nn.Module) -> nn.Module:
        return model.teacher_model.feature_extractor

    def fit_model(self, model: nn.Module, images: Tensor, seed: int) -> None:
        loss_fn = STFPMLoss()
        optimizer = torch.optim.SGD(model.student_model.parameters(), lr=0.4, momentum=0.9, dampening=0.0,
                                    weight_decay=0.001)  # anomalib's Stfpm.configure_optimizers
        gen = torch.Generator().manual_seed(seed)
        order: list[int] = []
        model.train()
        for _ in range(self.iterations):
            if len(order) < self.train_batch:  # epochs of shuffled images; a batch never spans two epochs
                order = torch.randperm(len(images), generator=gen).tolist()
            rows, order = order[: self.train_batch], order[self.train_batch :]
            teacher_features, student_features = model(images[rows])
            loss = loss_fn(teacher_features, student_features)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        self.final_loss = float(loss.detach()) if self.iterations else float("nan")
