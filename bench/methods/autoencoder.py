"""A small convolutional autoencoder in pixel space, one model for all categories: the anomaly map is
the per-pixel squared reconstruction error (summed over colour), blurred; the image score is the max of
the average-pooled map, as for DRDC."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from bench.methods.base import FitData, MethodInfo
from dcad.core.model.fusion import gaussian_blur, image_score


def _down(c_in: int, c_out: int) -> nn.Module:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 4, stride=2, padding=1), nn.BatchNorm2d(c_out), nn.LeakyReLU(0.2))


def _up(c_in: int, c_out: int) -> nn.Module:
    return nn.Sequential(nn.ConvTranspose2d(c_in, c_out, 4, stride=2, padding=1), nn.BatchNorm2d(c_out), nn.ReLU())


class ConvAutoencoder(nn.Module):
    """3 → 32 → 64 → 128 (stride 8) → bottleneck → back to 3 channels in [0, 1]."""

    def __init__(self, width: int = 32, bottleneck: int = 32) -> None:
        super().__init__()
        w = width
        self.encoder = nn.Sequential(_down(3, w), _down(w, 2 * w), _down(2 * w, 4 * w), nn.Conv2d(4 * w, bottleneck, 1))
        self.decoder = nn.Sequential(
            nn.Conv2d(bottleneck, 4 * w, 1), nn.ReLU(), _up(4 * w, 2 * w), _up(2 * w, w),
            nn.ConvTranspose2d(w, 3, 4, stride=2, padding=1), nn.Sigmoid(),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.decoder(self.encoder(x))


class Autoencoder:
    name = "autoencoder"
    info = MethodInfo("small convolutional autoencoder in pixel space, squared reconstruction error",
                      multi_class=True)
    batch_size = 32

    def __init__(self, iterations: int = 500, batch: int = 16, lr: float = 2e-3) -> None:
        self.iterations, self.batch, self.lr = iterations, batch, lr

    def fit(self, data: FitData) -> None:
        torch.manual_seed(data.seed)
        self.blur_sigma, self.pool_kernel = data.cfg.fusion.blur_sigma, data.cfg.fusion.pool_kernel
        self.net = ConvAutoencoder()
        optimiser = torch.optim.AdamW(self.net.parameters(), lr=self.lr, weight_decay=1e-4)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, self.iterations)
        gen = torch.Generator().manual_seed(data.seed)
        self.net.train()
        for _ in range(self.iterations):
            batch = data.images[torch.randint(len(data.images), (self.batch,), generator=gen)]
            loss = (self.net(batch) - batch).pow(2).mean()
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            schedule.step()
        self.net.eval()

    @torch.no_grad()
    def predict(self, images: Tensor, categories: list[str]) -> tuple[Tensor, Tensor]:
        error = (self.net(images) - images).pow(2).sum(dim=1)
        maps = gaussian_blur(error, self.blur_sigma)
        return image_score(maps, self.pool_kernel), maps
