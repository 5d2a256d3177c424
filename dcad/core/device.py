"""The torch device a command runs on."""

from __future__ import annotations

import torch

from dcad.core.errors import DcadError


def resolve_device(name: str = "auto") -> torch.device:
    """`auto` (a GPU when there is one), or a torch device string; DcadError for one this machine lacks."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise DcadError(f"--device {name}: not a device (auto, cpu, cuda, cuda:1 …)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DcadError(f"--device {name}: no CUDA GPU on this machine (use --device cpu or auto)")
    return device
