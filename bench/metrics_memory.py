"""Memory and speed of the streaming metrics (`dcad.core.metrics.AnomalyEvaluator`).

Peak Python-heap memory (tracemalloc, which sees numpy buffers) of evaluating N and then 10 x N
maps of the same size, streamed batch by batch with the maps generated on the fly: bounded-memory
metrics must grow by less than 1.5x. Also the accumulation speed (maps/s of `update`, 128 x 128,
one process) and the time of `compute`.

    python bench/metrics_memory.py            # writes bench/results/metrics_memory.json
"""

from __future__ import annotations

import argparse
import json
import os
import time
import tracemalloc
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")  # one core, before numpy loads

import numpy as np  # noqa: E402
from scipy import ndimage  # noqa: E402

from dcad.core.metrics import AnomalyEvaluator  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "metrics_memory.json"
CATEGORIES = ("bottle", "carpet", "screw")


def make_batch(rng: np.random.Generator, size: int, side: int):
    """scores, labels, maps (float32), masks, categories: blob defects on smooth noise."""
    labels = (rng.random(size) < 0.5).astype(np.int64)
    masks = np.zeros((size, side, side), bool)
    yy, xx = np.mgrid[:side, :side]
    for index in np.flatnonzero(labels):
        for _ in range(rng.integers(1, 4)):
            cy, cx, radius = rng.uniform(0, side), rng.uniform(0, side), rng.uniform(2, side / 8)
            masks[index] |= (yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2
    noise = ndimage.uniform_filter(rng.normal(size=masks.shape).astype(np.float32), size=(1, 5, 5))
    maps = noise + masks * np.float32(0.4)
    scores = maps.reshape(size, -1).max(axis=1)
    categories = [CATEGORIES[i % len(CATEGORIES)] for i in range(size)]
    return scores, labels, maps, masks, categories


def peak_memory_mb(n_images: int, side: int, batch_size: int, seed: int) -> tuple[float, float]:
    """(peak traced MB while streaming n_images and computing, size of the evaluator's state in KB)."""
    rng = np.random.default_rng(seed)
    tracemalloc.start()
    tracemalloc.reset_peak()
    evaluator = AnomalyEvaluator()
    for start in range(0, n_images, batch_size):
        evaluator.update(*make_batch(rng, min(batch_size, n_images - start), side))
    evaluator.compute()
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return peak / 2**20, state_kb(evaluator)


def state_kb(evaluator: AnomalyEvaluator) -> float:
    total = 0
    for category in evaluator.state_dict()["categories"].values():
        total += category["image_scores"].nbytes + category["image_labels"].nbytes
        for histogram in category["pixels"].values():
            total += sum(histogram[name].nbytes for name in ("index", "normal", "anomalous", "region_weight"))
    return total / 1024


def accumulation_speed(n_maps: int, side: int, batch_size: int, seed: int) -> tuple[float, float]:
    """(maps/s of `update` on pre-generated batches, seconds of one `compute`)."""
    rng = np.random.default_rng(seed)
    batches = [make_batch(rng, batch_size, side) for _ in range(8)]
    evaluator = AnomalyEvaluator()
    evaluator.update(*batches[0])  # warm-up (first-batch width search)
    done, started = 0, time.perf_counter()
    while done < n_maps:
        evaluator.update(*batches[(done // batch_size) % len(batches)])
        done += batch_size
    maps_per_s = done / (time.perf_counter() - started)
    started = time.perf_counter()
    evaluator.compute()
    return maps_per_s, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-small", type=int, default=50)
    parser.add_argument("--side", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=10)
    parser.add_argument("--speed-maps", type=int, default=800)
    parser.add_argument("--speed-side", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    n_small, n_large = args.n_small, 10 * args.n_small
    peak_small, state_small = peak_memory_mb(n_small, args.side, args.batch_size, args.seed)
    peak_large, state_large = peak_memory_mb(n_large, args.side, args.batch_size, args.seed)
    speed, compute_s = accumulation_speed(args.speed_maps, args.speed_side, 16, args.seed)
    result = {
        "n_small": n_small,
        "n_large": n_large,
        "peak_small_mb": round(peak_small, 3),
        "peak_large_mb": round(peak_large, 3),
        "ratio": round(peak_large / peak_small, 4),
        "map_side": args.side,
        "state_small_kb": round(state_small, 1),
        "state_large_kb": round(state_large, 1),
        "all_maps_large_mb": round(n_large * args.side**2 * 4 / 2**20, 1),  # what keeping float32 maps costs
        "maps_per_s": round(speed, 1),
        "maps_per_s_side": args.speed_side,
        "compute_s": round(compute_s, 4),
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    verdict = "OK" if result["ratio"] < 1.5 else "FAIL"
    print(f"{verdict}: peak grows {result['ratio']:.3f}x for 10x the maps (must be < 1.5x); wrote {RESULTS}")


if __name__ == "__main__":
    main()
