"""`train_drdc` as each Ray worker runs it (`TrainRole`), without Ray: who writes, who wraps, who calibrates."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from ray_helpers import ray_dataset  # noqa: F401

OVERRIDES = {
    "ablation.mode": "base_only",
    "train.base.epochs": 2,
    "train.base.iters_per_epoch": 2,
    "train.val_max_images": 4,
}


class CountingWrapper(nn.Module):
    """Stands in for DDP: forwards to the module and counts the calls."""

    def __init__(self, module: nn.Module, calls: list) -> None:
        super().__init__()
        self.module = module
        self.calls = calls

    def forward(self, *args, **kwargs):
        self.calls.append(type(self.module).__name__)
        return self.module(*args, **kwargs)


@pytest.fixture(scope="module")
def setup(ray_dataset):  # noqa: F811
    from dcad.core.config import load_config
    from dcad.core.data import build_splits

    cfg = load_config(profile="tiny", overrides=OVERRIDES)
    return cfg, build_splits(ray_dataset, cfg.data)


def _train(setup, tmp_path, **kwargs):
    from dcad.train.pipeline import TrainHooks, train_drdc

    cfg, splits = setup
    hooks = TrainHooks()
    model, metrics = train_drdc(cfg, splits, device=torch.device("cpu"), checkpoint_dir=tmp_path, hooks=hooks, **kwargs)
    return model, metrics, hooks


def test_non_chief_trains_through_the_wrapper_but_writes_and_calibrates_nothing(setup, tmp_path):
    from dcad.train.pipeline import TrainRole

    calls: list = []
    role = TrainRole(chief=False, wrap_module=lambda m: CountingWrapper(m, calls))
    model, metrics, hooks = _train(setup, tmp_path / "ckpt", role=role)
    assert calls and set(calls) == {"BaseReconstructor"}  # every training step went through the wrapper
    assert len(calls) == OVERRIDES["train.base.epochs"] * OVERRIDES["train.base.iters_per_epoch"]
    assert metrics == {}
    assert not (tmp_path / "ckpt").exists()
    assert math.isnan(float(model.calibration.image_threshold))
    assert [h["epoch"] for h in hooks.history] == [1, 2]
    assert all("val_loss" not in h for h in hooks.history)  # validation is the chief's job


@pytest.mark.slow
def test_chief_checkpoints_and_a_resumed_worker_skips_the_finished_stage(setup, tmp_path):
    from dcad.train.pipeline import TrainRole

    model, metrics, hooks = _train(setup, tmp_path)
    assert (tmp_path / "base.pt").is_file()
    assert "val_loss" in hooks.history[-1] and "val_image_f1" in metrics
    assert not math.isnan(float(model.calibration.image_threshold))

    phases: list[str] = []
    from dcad.train.pipeline import TrainHooks, train_drdc

    cfg, splits = setup
    resumed, _ = train_drdc(
        cfg, splits, device=torch.device("cpu"), checkpoint_dir=tmp_path, resume=True,
        hooks=TrainHooks(on_phase=phases.append), role=TrainRole(chief=False),
    )
    assert any(p.startswith("base: finished earlier (epoch 2)") for p in phases)
    for key, value in model.base.state_dict().items():
        assert torch.equal(value, resumed.base.state_dict()[key]), key
