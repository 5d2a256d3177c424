"""Typed configuration of a DRDC model and its training.

One tree (`DCADConfig`) describes data handling, the model (backbone, base branch, refinement
branch, fusion) and training. Profiles (`tiny`, `cpu`, `paper`) ship as YAML next to this module;
users override any field with dotted keys (`--set refiner.guidance_scale=1.5`).
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any, Callable, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from dcad.core.errors import DcadError
from dcad.core.yaml_io import read_yaml_mapping

PROFILES = ("tiny", "cpu", "paper")
RETIRED_DATA_KEYS = ("num_workers",)  # accepted (and ignored) in configs written before they were removed


class ConfigError(DcadError):
    """A configuration file, profile or override is invalid; the message names the key."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(_Strict):
    image_size: int = Field(128, ge=16, description="Images are resized to this square size.")
    val_fraction: float = Field(0.2, gt=0.0, lt=1.0, description="Share of normal train images held out.")
    val_seed: int = 0
    val_anomaly_fraction: float = Field(0.5, ge=0.0, le=1.0, description="Share of validation images given a pasted defect.")
    categories: list[str] | None = Field(None, description="Restrict to these categories (default: all).")


class BackboneConfig(_Strict):
    name: str = "tf_efficientnet_lite0"
    out_indices: list[int] = Field(default_factory=lambda: [1, 2, 3])
    weights: str = Field("auto", description="'auto' (offline resolution), 'none' (random, warns) or a file path.")
    feature_stride: int = Field(16, description="All stages are resized to this stride and concatenated.")

    @field_validator("feature_stride")
    @classmethod
    def _power_of_two(cls, v: int) -> int:
        if v not in (4, 8, 16, 32):
            raise ValueError("must be one of 4, 8, 16, 32")
        return v


class MemoryConfig(_Strict):
    """The patch memory of `base.map: memory`: nearest-neighbour distances to normal training patches
    (PatchCore-style), one coreset per category."""

    stride: int = Field(4, ge=1, description="The memory's grid: image_size / stride patches a side.")
    pool: int = Field(3, ge=1, description="Each backbone stage averaged over pool × pool neighbours (odd).")
    coreset_ratio: float = Field(0.1, gt=0.0, le=1.0, description="Share of each category's training patches kept "
                                 "(greedy k-centre).")
    projection_dim: int = Field(128, ge=0, description="Random projection of the coreset's distances (0: none).")

    @field_validator("pool")
    @classmethod
    def _odd(cls, value: int) -> int:
        if value % 2 == 0:
            raise ValueError(f"must be odd, got {value}")
        return value


class BaseBranchConfig(_Strict):
    map: Literal["reconstruction", "memory"] = Field(
        "reconstruction", description="The base map: the transformer's feature reconstruction error, or the distance "
        "to the nearest normal training patch (`memory`; the transformer is then not built).")
    memory: MemoryConfig = Field(default_factory=MemoryConfig)
    hidden_dim: int = Field(256, ge=8)
    num_encoder_layers: int = Field(4, ge=1)
    num_decoder_layers: int = Field(4, ge=1)
    num_heads: int = Field(8, ge=1)
    ffn_dim: int = Field(1024, ge=8)
    dropout: float = Field(0.1, ge=0.0, lt=1.0)
    neighbor_size: int = Field(7, ge=0, description="k of the k×k neighbourhood a token may not attend to (0: off).")
    jitter_scale: float = Field(20.0, ge=0.0, description="Feature jitter: noise scale relative to the feature norm (UniAD α).")
    jitter_prob: float = Field(1.0, ge=0.0, le=1.0)
    distance: Literal["l2", "cosine"] = Field(
        "l2", description="Base map and loss: L2 over all channels, or 1 − cosine per backbone stage, averaged (Dinomaly).")


class UNetConfig(_Strict):
    block_out_channels: list[int] = Field(default_factory=lambda: [32, 64, 64])
    layers_per_block: int = Field(1, ge=1)
    attention_levels: list[bool] = Field(default_factory=lambda: [False, False, True])
    norm_num_groups: int = Field(8, ge=1)


class SchedulerConfig(BaseModel):
    """A diffusers noise scheduler: `class_name` and the arguments of its `from_config` (any it takes)."""

    model_config = ConfigDict(extra="allow", validate_assignment=True)
    class_name: str = Field("DDIMScheduler", description="A diffusers scheduler class, e.g. DDIMScheduler, DDPMScheduler.")
    num_train_timesteps: int = Field(1000, ge=10)
    beta_schedule: Literal["linear", "scaled_linear", "squaredcos_cap_v2"] = "linear"
    beta_start: float = Field(1e-4, gt=0.0, lt=1.0)
    beta_end: float = Field(0.02, gt=0.0, lt=1.0)
    prediction_type: Literal["epsilon", "v_prediction", "sample"] = "epsilon"

    def scheduler_kwargs(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude={"class_name"})


class RefinementBudget(_Strict):
    """Which images and pixels the refinement branch spends its UNet passes on (adaptive refinement).

    The default (``windows: 0``, ``skip_quantile: 0``) refines every pixel of every image. With ``windows: K``
    the denoiser inpaints only K windows per image, centred on the base map's strongest responses (the only
    places where the gated fusion lets the refinement count); elsewhere the refinement map is "normal"
    (standardised value 0). With ``skip_quantile: q`` an image whose base image score lies below the q-quantile
    of the normal validation images' is not refined at all (a cascade: the base branch is already sure).
    """

    windows: int = Field(0, ge=0, description="Windows refined per image at the base map's peaks (0: the whole image).")
    window_size: int = Field(48, ge=8, description="Side of a window, px (a multiple of the largest patch size).")
    skip_quantile: float = Field(
        0.0, ge=0.0, le=1.0, description="Cascade: skip images whose base score is below this quantile of normal "
        "validation images' (0: refine every image).")

    @property
    def adaptive(self) -> bool:
        return self.windows > 0 or self.skip_quantile > 0


class RefinerConfig(_Strict):
    enabled: bool = True
    unet: UNetConfig = Field(default_factory=UNetConfig)
    scheduler: SchedulerConfig = Field(default_factory=SchedulerConfig)
    patch_sizes: list[int] = Field(default_factory=lambda: [8, 16], description="Inpainting scales (cell sizes, pixels).")
    groups: int = Field(2, ge=2, description="Complementary mask groups per scale (2 = checkerboard).")
    timesteps: list[int] = Field(default_factory=lambda: [100, 250], description="Selected inference timesteps τ.")
    ddim_steps: int = Field(1, ge=1, description="Denoising steps from τ to 0 (1 = one-step x̂0).")
    class_conditioning: bool = Field(True, description="Model conditioning: class embedding (with a null class).")
    cond_dropout: float = Field(0.1, ge=0.0, le=1.0, description="Probability of the null class in training.")
    test_time_conditioning: bool = Field(True, description="Condition on visible context and base map at test time.")
    base_map_channel: bool = Field(True, description="Feed the base map to the denoiser as a channel.")
    guidance_scale: float = Field(1.0, ge=0.0, description="Classifier-free guidance weight w (1 = conditional only).")
    hf_kind: Literal["gaussian", "laplacian"] = "gaussian"
    hf_sigma: float = Field(1.5, gt=0.0)
    crop_size: int = Field(64, ge=8, description="Training crop size (the UNet is fully convolutional).")
    seed: int = 1234
    space_to_depth: Literal[1, 2, 4] = Field(
        1, description="Pixel-unshuffle stem r: the UNet runs at 1/r resolution on r² channels (≈r² cheaper; lossless)."
    )
    max_batch: int = Field(32, ge=1, description="Most UNet samples per call at inference (bounds memory).")
    hf_inner_sigma: float = Field(
        0.0, ge=0.0, description="Band-pass: blur x and x̂ by this σ before the high-pass (0 = plain high frequency)."
    )
    compare: Literal["pixels", "features"] = Field(
        "pixels", description="Refinement map: band-passed pixels of x and x̂, or 1 − cosine of the backbone's "
        "earliest stages of x and x̂ (`compare_stages` of them).")
    compare_stages: int = Field(1, ge=1, description="features: how many of the earliest backbone stages to compare.")
    budget: RefinementBudget = Field(default_factory=RefinementBudget)
    precision: Literal["float32", "bfloat16", "auto"] = Field(
        "float32", description="Denoiser arithmetic at inference: bfloat16 autocast, or auto (bfloat16 where the "
        "hardware has it: CUDA with bf16, CPUs with AVX512-BF16/AMX; float32 elsewhere).")
    train_timestep_max: int | None = Field(
        None, ge=2, description="Train on t ~ U[1, this) instead of the full schedule (None: num_train_timesteps)."
    )


class FusionConfig(_Strict):
    mode: Literal["sum", "product", "gated"] = "gated"
    base_weight: float = Field(0.5, ge=0.0, le=1.0, description="λ: weight of the base map in the combination.")
    weights: dict[str, float] | None = Field(None, description="w(τ,s) keyed 't{τ}_s{s}'; uniform when empty.")
    blur_sigma: float = Field(2.0, ge=0.0)
    pool_kernel: int = Field(16, ge=1, description="Image score: max of the average-pooled map.")
    image_map: Literal["final", "base"] = Field(
        "final", description="The map the full model's image score pools: the final map, or the (blurred, "
        "standardised) base map, when the refinement is to sharpen localisation but not decide which images are anomalous."
    )
    gate_offset: float = Field(1.0, description="gated: k in σ((base − k)/T), the base level where refinement counts half.")
    gate_temperature: float = Field(0.5, gt=0.0, description="gated: T, the softness of the gate.")
    stats: Literal["scalar", "pixel"] = Field(
        "scalar", description="Refinement-map standardisation: one mean/std per map, or per pixel (smoothed)."
    )


class StageTrainConfig(_Strict):
    epochs: int = Field(10, ge=1)
    iters_per_epoch: int = Field(100, ge=1)
    batch_size: int = Field(16, ge=1)
    lr: float = Field(1e-4, gt=0.0)
    weight_decay: float = Field(1e-4, ge=0.0)
    warmup_iters: int = Field(0, ge=0)
    grad_clip: float = Field(1.0, ge=0.0)


class TrainConfig(_Strict):
    seed: int = 0
    amp: bool = Field(True, description="Mixed precision (used on GPU only).")
    base: StageTrainConfig = Field(default_factory=StageTrainConfig)
    refiner: StageTrainConfig = Field(default_factory=lambda: StageTrainConfig(lr=2e-4))
    eval_batch_size: int = Field(16, ge=1)
    val_max_images: int = Field(256, ge=1, description="Validation images scored at each epoch end.")
    validate_refiner: bool = Field(True, description="Calibrate and score validation after each refiner epoch.")


class Ablation(_Strict):
    """Switches used by ablations; `mode` selects which branches produce the final map."""

    mode: Literal["full", "base_only", "refine_only"] = "full"


class DCADConfig(_Strict):
    profile: str = "custom"
    data: DataConfig = Field(default_factory=DataConfig)
    backbone: BackboneConfig = Field(default_factory=BackboneConfig)
    base: BaseBranchConfig = Field(default_factory=BaseBranchConfig)
    refiner: RefinerConfig = Field(default_factory=RefinerConfig)
    fusion: FusionConfig = Field(default_factory=FusionConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    ablation: Ablation = Field(default_factory=Ablation)

    # ---- loading -------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> "DCADConfig":
        try:
            return cls.model_validate(_drop_retired(data))
        except ValidationError as err:
            raise ConfigError(f"{source}: {validation_error_line(err)}") from None

    @classmethod
    def from_yaml(cls, path: str | Path) -> "DCADConfig":
        path = Path(path)
        data = read_yaml_mapping(path, "config", ConfigError)
        return cls.from_dict(data, str(path))

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)

    def flat(self) -> dict[str, Any]:
        """Dotted-key view, e.g. for MLflow params."""
        return flatten(self.model_dump(mode="json"))

    @property
    def base_epochs(self) -> int:
        """Epochs the base stage trains (none with `base.map: memory`, whose memory is fitted, not trained)."""
        return 0 if self.base.map == "memory" else self.train.base.epochs

    @property
    def total_epochs(self) -> int:
        """Epochs a training reports across both stages (the base's, then the refiner's when it has one)."""
        return self.base_epochs + (self.train.refiner.epochs if self.uses_refiner else 0)

    @property
    def uses_refiner(self) -> bool:
        """Whether a model of this config has (and uses) the refinement branch."""
        return self.refiner.enabled and self.ablation.mode != "base_only"


def _drop_retired(data: dict[str, Any]) -> dict[str, Any]:
    """`data` without the keys older configs (e.g. in model directories) still carry."""
    section = data.get("data")
    if isinstance(section, dict) and any(k in section for k in RETIRED_DATA_KEYS):
        data = {**data, "data": {k: v for k, v in section.items() if k not in RETIRED_DATA_KEYS}}
    return data


def validation_error_line(err: ValidationError, key: Callable[[tuple], str] | None = None,
                          **by_type: Callable[[dict, str], str]) -> str:
    """The first error of a pydantic validation as one line naming its dotted key (`by_type`: messages of
    other error types, given the error and the key)."""
    e = err.errors()[0]
    where = key(e["loc"]) if key else ".".join(str(p) for p in e["loc"]) or "<root>"
    if e["type"] in by_type:
        return by_type[e["type"]](e, where)
    if e["type"] == "extra_forbidden":
        return f"unknown key '{where}'"
    if e["type"] == "missing":
        return f"missing key '{where}'"
    return f"invalid value for '{where}': {e['msg'].removeprefix('Value error, ')}"


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def profile_dict(name: str) -> dict[str, Any]:
    if name not in PROFILES:
        raise ConfigError(f"unknown profile '{name}' (choose from {', '.join(PROFILES)})")
    text = resources.files("dcad.core").joinpath("profiles", f"{name}.yaml").read_text()
    return yaml.safe_load(text) or {}


def parse_override(item: str) -> tuple[str, Any]:
    if "=" not in item:
        raise ConfigError(f"override '{item}' must look like key.path=value")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override '{item}' has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key, value


def set_dotted(tree: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = tree
    for i, part in enumerate(parts[:-1]):
        nxt = node.get(part)
        if nxt is None:
            nxt = node[part] = {}
        if not isinstance(nxt, dict):
            raise ConfigError(f"unknown key '{key}': '{'.'.join(parts[: i + 1])}' is not a section")
        node = nxt
    node[parts[-1]] = value


def apply_overrides(data: dict[str, Any], overrides: list[str] | dict[str, Any] | None) -> dict[str, Any]:
    items = overrides.items() if isinstance(overrides, dict) else (parse_override(o) for o in overrides or [])
    for key, value in items:
        set_dotted(data, key, value)
    return data


def load_config(
    profile: str | None = None,
    config_path: str | Path | None = None,
    overrides: list[str] | dict[str, Any] | None = None,
) -> DCADConfig:
    """Profile (or a YAML file, which may name a `profile` to start from) plus dotted overrides."""
    data: dict[str, Any] = {}
    if config_path is not None:
        cfg = DCADConfig.from_yaml(config_path)  # validates the file on its own first
        data = cfg.model_dump(mode="json", exclude_unset=True)
        base = data.get("profile")
        if profile is None and base in PROFILES:
            profile = base
    if profile is not None:
        merged = profile_dict(profile)
        _deep_update(merged, data)
        data = merged
        data.setdefault("profile", profile)
    data = apply_overrides(data, overrides)
    return DCADConfig.from_dict(data, source=f"profile '{profile}'" if profile else "config")


def _deep_update(dst: dict[str, Any], src: dict[str, Any]) -> None:
    for k, v in src.items():
        if isinstance(v, dict) and isinstance(dst.get(k), dict):
            _deep_update(dst[k], v)
        else:
            dst[k] = v
