"""DRDC ablation table (issue 4): which parts of the method earn their cost.

From one trained model directory (with its `checkpoints/`):

- eval-time switches of the same weights: full, base only, refinement only, single timestep, single scale;
- retrained refiners on the *same* base branch (its finished checkpoint is reused, so only the
  denoiser differs): no model conditioning (`refiner.class_conditioning=false`) and no test-time
  conditioning (`refiner.test_time_conditioning=false`: the denoiser sees only the noised image).

Every row is calibrated on the validation split and scored once on the test split.

    python bench/drdc_ablation.py runs/cpu --data data/synth     # writes bench/results/drdc_ablation.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

import torch

from dcad.core.config import DCADConfig
from dcad.core.data.validation import build_splits
from dcad.core.inference import evaluate
from dcad.core.model.drdc import DRDC, with_inference_overrides
from dcad.core.model.model_dir import load_model
from dcad.train.pipeline import train_drdc

RESULTS = Path(__file__).parent / "results" / "drdc_ablation.json"
METRICS = ("image_auroc", "pixel_auroc", "aupro", "pixel_ap")
RETRAINED = {
    "no model conditioning": ["refiner.class_conditioning=false"],
    "no test-time conditioning": ["refiner.test_time_conditioning=false"],
}


def eval_time_variants(cfg: DCADConfig) -> dict[str, list[str]]:
    """Rows that reuse the trained weights: only inference keys change."""
    taus, scales = cfg.refiner.timesteps, cfg.refiner.patch_sizes

    def only(keep) -> str:
        weights = {f"t{t}_s{s}": float(keep(t, s)) for t in taus for s in scales}
        return "fusion.weights=" + json.dumps(weights)

    return {
        "full": [],
        "base only": ["ablation.mode=base_only"],
        "refinement only": ["ablation.mode=refine_only"],
        f"single timestep (τ={taus[0]})": [only(lambda t, s: t == taus[0])],
        f"single scale (s={scales[0]})": [only(lambda t, s: s == scales[0])],
    }


def test_metrics(model: DRDC, test, batch_size: int) -> dict:
    start = time.perf_counter()
    result = evaluate(model, test, batch_size, "cpu")
    seconds = time.perf_counter() - start
    row = {k: round(result["mean"][k], 4) for k in METRICS}
    row["ms_per_image"] = round(1000 * seconds / len(test), 1)
    row["per_category"] = {c: {k: round(v[k], 4) for k in METRICS} for c, v in result["categories"].items()}
    return row


def retrain_refiner(model_dir: Path, overrides: list[str], splits, work: Path) -> tuple[DRDC, float]:
    """Train a new denoiser on the finished base branch of `model_dir` (its checkpoint; a patch memory, which has
    none, is fitted again: the same coreset, it is deterministic), then calibrate."""
    cfg = load_model(model_dir).cfg
    cfg = DCADConfig.from_dict(_with_overrides(cfg, overrides))
    checkpoints = work / "checkpoints"
    checkpoints.mkdir(parents=True, exist_ok=True)
    if (model_dir / "checkpoints" / "base.pt").is_file():
        shutil.copy2(model_dir / "checkpoints" / "base.pt", checkpoints / "base.pt")
    start = time.perf_counter()
    model, _ = train_drdc(cfg, splits, device=torch.device("cpu"), checkpoint_dir=checkpoints, resume=True)
    return model.eval(), time.perf_counter() - start


def _with_overrides(cfg: DCADConfig, overrides: list[str]) -> dict:
    from dcad.core.config import apply_overrides

    return apply_overrides(cfg.model_dump(mode="json"), overrides)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path, help="A model directory written by `dcad train` (keeps checkpoints/).")
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--skip-retrained", action="store_true", help="Only the eval-time rows.")
    parser.add_argument("--work", type=Path, default=Path(".dcad/bench-ablation"))
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 2)

    base_model = load_model(args.model)
    splits = build_splits(args.data, base_model.cfg.data)
    bs = base_model.cfg.train.eval_batch_size
    rows: dict[str, dict] = {}
    for name, overrides in eval_time_variants(base_model.cfg).items():
        rows[name] = test_metrics(with_inference_overrides(load_model(args.model), overrides), splits.test, bs)
        print(f"{name:32s} {rows[name]['image_auroc']:.3f} {rows[name]['pixel_auroc']:.3f} {rows[name]['aupro']:.3f}",
              flush=True)
    if not args.skip_retrained:
        for name, overrides in RETRAINED.items():
            model, seconds = retrain_refiner(args.model, overrides, splits, args.work / name.replace(" ", "_"))
            rows[name] = {**test_metrics(model, splits.test, bs), "refiner_train_s": round(seconds, 1)}
            print(f"{name:32s} {rows[name]['image_auroc']:.3f} {rows[name]['pixel_auroc']:.3f} "
                  f"{rows[name]['aupro']:.3f}", flush=True)
    result = {"model": str(args.model), "data": str(args.data), "rows": rows,
              "load_avg": [round(x, 2) for x in os.getloadavg()]}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
