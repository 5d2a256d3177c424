"""What each refinement speed-up buys on its own, and all of them together (one trained model, one run).

    python bench/refinement_speedups.py MODEL_DIR [--seed 0] [--repeats 3]

Starting from refining every pixel at the model's timesteps in float32 with 2-D Gaussian kernels (DRDC before
adaptive refinement), each speed-up is switched on alone, then cumulatively:

- ``separable``: Gaussian blurs and the image score's box filter as two 1-D passes (was one 2-D kernel);
- ``one_timestep``: refinement at τ = the first of the model's timesteps only;
- ``windows``: one 48 px window per image at the base map's peak (`refiner.budget.windows=1`);
- ``bfloat16``: the denoiser under bf16 autocast (`refiner.precision=bfloat16`; on CPUs with AVX512-BF16/AMX).

Timing: ms/image over the seed's validation images (batch 16, after one warm-up batch), best of `--repeats`,
each variant calibrated on the same images first (its statistics depend on the refined pixels). The base
branch alone is timed in the same run. Results go to bench/results/refinement_speedups.json.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torchvision.transforms.functional import gaussian_blur as tv_gaussian_blur

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.suite_data import SynthSpec, prepare  # noqa: E402
from dcad.core.config import RefinementBudget  # noqa: E402
from dcad.core.inference import loader_for  # noqa: E402
from dcad.core.model import drdc as drdc_module  # noqa: E402
from dcad.core.model import fusion, inpainting  # noqa: E402
from dcad.core.model.drdc import DRDC, Calibration  # noqa: E402
from dcad.core.model.model_dir import load_model  # noqa: E402
from dcad.train.calibrate import calibrate  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "refinement_speedups.json"
SPEEDUPS = ("separable", "one_timestep", "windows", "bfloat16")


def blur_2d(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """The Gaussian blur as it was: torchvision's 2-D kernel."""
    if sigma <= 0:
        return x
    h, w = x.shape[-2:]
    radius = min(math.ceil(3.0 * sigma), h - 1, w - 1)
    if radius < 1:
        return x
    out = tv_gaussian_blur(x.reshape(-1, 1, h, w), kernel_size=[2 * radius + 1] * 2, sigma=[float(sigma)] * 2)
    return out.reshape(x.shape)


def image_score_2d(anomaly_map: torch.Tensor, pool_kernel: int) -> torch.Tensor:
    """The image score as it was: one k×k average pool."""
    maps = anomaly_map if anomaly_map.dim() == 4 else anomaly_map.unsqueeze(1)
    k = max(1, min(pool_kernel, *maps.shape[-2:]))
    return F.avg_pool2d(maps, kernel_size=k, stride=1).flatten(1).amax(dim=1)


@contextlib.contextmanager
def two_d_filters():
    """Swap the 2-D filters back in wherever the model looks them up."""
    saved = [(mod, name, getattr(mod, name)) for mod, name in
             ((fusion, "gaussian_blur"), (inpainting, "gaussian_blur"), (drdc_module, "gaussian_blur"),
              (fusion, "image_score"), (drdc_module, "image_score"))]
    replacement = {"gaussian_blur": blur_2d, "image_score": image_score_2d}
    try:
        for mod, name, _ in saved:
            setattr(mod, name, replacement[name])
        yield
    finally:
        for mod, name, original in saved:
            setattr(mod, name, original)


def variant(model: DRDC, on: set[str]) -> DRDC:
    """A copy of the model with the given speed-ups (besides `separable`, which is a context) switched on."""
    view = copy.deepcopy(model)
    cfg = view.cfg.model_copy(deep=True)
    if "one_timestep" in on:
        cfg.refiner.timesteps = cfg.refiner.timesteps[:1]
        cfg.fusion.weights = None
    cfg.refiner.budget = RefinementBudget(windows=1, window_size=48) if "windows" in on else RefinementBudget()
    cfg.refiner.precision = "bfloat16" if "bfloat16" in on else "float32"
    cfg.ablation.mode = "full"
    view.cfg = cfg
    view.calibration = Calibration(len(cfg.refiner.timesteps), len(cfg.refiner.patch_sizes), len(view.categories),
                                   view.image_size, cfg.fusion)
    return view


def ms_per_image(model: DRDC, batches: list, repeats: int) -> float:
    with torch.no_grad():
        model(*batches[0])  # warm-up
        best = math.inf
        for _ in range(repeats):
            start = time.perf_counter()
            for images, cats in batches:
                model(images, cats)
            best = min(best, time.perf_counter() - start)
    return 1000.0 * best / sum(len(b[0]) for b in batches)


def measure(model: DRDC, on: set[str], val, batches: list, repeats: int) -> float:
    view = variant(model, on)
    filters = contextlib.nullcontext() if "separable" in on else two_d_filters()
    with filters:
        calibrate(view, val, 16, "cpu")
        return ms_per_image(view, batches, repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("--seed", type=int, default=0, help="the seed the model was trained on (its validation split)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cache", default=".dcad/bench-data")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 2)
    model = load_model(args.model).eval()
    data = prepare(Path(args.cache), SynthSpec(size=model.cfg.data.image_size), args.seed, model.cfg)
    val = data.splits.val
    batches = [(b["image"], b["category_index"]) for b in loader_for(val, 16)]
    base = copy.copy(model)
    base.cfg = model.cfg.model_copy(update={"ablation": model.cfg.ablation.model_copy(update={"mode": "base_only"})})
    rows = {"base_only": ms_per_image(base, batches, args.repeats)}
    print(f"base_only {rows['base_only']:.1f} ms/image", flush=True)
    plan = [("before", set())] + [(f"{s} alone", {s}) for s in SPEEDUPS]
    plan += [(" + ".join(SPEEDUPS[: i + 1]), set(SPEEDUPS[: i + 1])) for i in range(1, len(SPEEDUPS))]
    for name, on in plan:
        rows[name] = measure(model, on, val, batches, args.repeats)
        print(f"{name:<45} {rows[name]:7.1f} ms/image  ({rows['before'] / rows[name]:.1f}× faster than before)",
              flush=True)
    result = {"model": str(args.model), "seed": args.seed, "validation_images": len(val),
              "timesteps": model.cfg.refiner.timesteps, "torch_threads": torch.get_num_threads(),
              "ms_per_image": {k: round(v, 2) for k, v in rows.items()},
              "speedup_vs_before": {k: round(rows["before"] / v, 2) for k, v in rows.items() if k != "base_only"},
              "load_avg": [round(x, 2) for x in os.getloadavg()]}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
