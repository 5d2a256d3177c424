"""Which arithmetic the denoiser runs in at inference (`refiner.precision`)."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import torch


def uses_bfloat16(precision: str, device: torch.device) -> bool:
    """`bfloat16`: always; `float32`: never; `auto`: where the hardware computes in bf16 natively."""
    if precision != "auto":
        return precision == "bfloat16"
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and cpu_has_bfloat16()


@lru_cache(maxsize=1)
def cpu_has_bfloat16(cpuinfo: str | None = None) -> bool:
    """True when the CPU's flags list AVX512-BF16 or AMX-BF16 (Linux `/proc/cpuinfo`; False where unreadable):
    elsewhere bfloat16 convolutions are emulated and slower than float32."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return False
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            return bool({"avx512_bf16", "amx_bf16"} & set(line.split(":", 1)[-1].split()))
    return False
