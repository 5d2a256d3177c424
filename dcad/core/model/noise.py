"""The refiner's noise schedule: any diffusers scheduler named in `refiner.scheduler`, used through its public API.

The refiner needs `add_noise` (noise an image to a timestep), `step(...).pred_original_sample` (x̂0 from a
model output at any training timestep, in any order) and, for a v-prediction model, `get_velocity` (the
training target). DDIMScheduler and DDPMScheduler can; a class that cannot is refused in one line.

A few-step chain [τ, …] is not a schedule `step(...).prev_sample` can walk (DDIM steps by a fixed
num_train_timesteps // num_inference_steps), so `ddim_move` takes each deterministic step with `add_noise`.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Any

import diffusers
import torch
from torch import Tensor

from dcad.core.config import SchedulerConfig
from dcad.core.errors import ModelError

CONFIG_NAME = "scheduler_config.json"  # diffusers' `save_config` file name
DEFAULTS = {"clip_sample": False}  # images live in [-1, 1]; x̂0 is clamped after the groups are pasted


def scheduler_class(name: str) -> type:
    cls = getattr(diffusers, name, None)
    if not (isinstance(cls, type) and issubclass(cls, diffusers.SchedulerMixin)):
        raise ModelError(f"refiner.scheduler.class_name={name}: not a diffusers scheduler class")
    return cls


def build_scheduler(cfg: SchedulerConfig) -> Any:
    """`class_name.from_config(the other keys)`, checked to do what the refiner needs."""
    cls = scheduler_class(cfg.class_name)
    accepted = set(inspect.signature(cls.__init__).parameters) - {"self"}
    kwargs = cfg.scheduler_kwargs()
    unknown = sorted(set(kwargs) - accepted)
    if unknown:
        raise ModelError(f"refiner.scheduler: {cfg.class_name} takes no {', '.join(unknown)}")
    return checked(cls.from_config({**{k: v for k, v in DEFAULTS.items() if k in accepted}, **kwargs}))


def load_scheduler(directory: str | Path) -> Any:
    """The scheduler saved by `save_config(directory)` (its `_class_name` names the class)."""
    config = json.loads((Path(directory) / CONFIG_NAME).read_text())
    return checked(scheduler_class(config["_class_name"]).from_config(config))


def checked(scheduler: Any) -> Any:
    """`scheduler`, every training timestep set as an inference one, after a probe: x̂0 of `step` must undo
    `add_noise` at any timestep in any order (stateful samplers such as Euler's cannot); ModelError if not."""
    name, steps = type(scheduler).__name__, scheduler.config.num_train_timesteps
    x0, eps = torch.full((1, 1, 1, 1), 0.5), torch.ones(1, 1, 1, 1)
    try:
        scheduler.set_timesteps(steps)
        probe = type(scheduler).from_config({**scheduler.config, "prediction_type": "epsilon"})
        probe.set_timesteps(steps)
        for t in (steps // 2, 1, steps - 1, steps // 2):
            got = probe.step(eps, t, probe.add_noise(x0, eps, torch.tensor([t]))).pred_original_sample
            if not torch.allclose(got, x0, atol=1e-3):
                raise ValueError(f"x̂0 {float(got)} at t={t}")
        if scheduler.config.prediction_type == "v_prediction":
            scheduler.get_velocity(x0, eps, torch.tensor([1]))
    except Exception as err:  # any failure means the class cannot serve the refiner
        raise ModelError(f"refiner.scheduler.class_name={name}: the refiner needs add_noise and step(...)."
                         f"pred_original_sample at any timestep, which it cannot do ({type(err).__name__})") from None
    return scheduler


def predict_x0(scheduler: Any, model_output: Tensor, t: Tensor, x_t: Tensor) -> Tensor:
    """x̂0 of each sample (per-sample timesteps `t` [N]) through `scheduler.step`, one call per distinct timestep."""
    x0 = torch.empty_like(x_t)
    for value in t.unique().tolist():
        rows = t == value
        x0[rows] = scheduler.step(model_output[rows], int(value), x_t[rows]).pred_original_sample.to(x0.dtype)
    return x0


def ddim_move(scheduler: Any, x_t: Tensor, x0: Tensor, t: Tensor, t_next: Tensor) -> Tensor:
    """The deterministic DDIM (η = 0) update from t to t_next: x̂0 noised to t_next with the noise x_t implies
    under the scheduler's own (affine) `add_noise`."""
    zeros = torch.zeros_like(x0)
    noise = (x_t - scheduler.add_noise(x0, zeros, t)) / scheduler.add_noise(zeros, torch.ones_like(x0), t).clamp_min(1e-8)
    return scheduler.add_noise(x0, noise, t_next)
