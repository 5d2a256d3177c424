"""DRDC design variants, chosen on validation: train one config per variant, report validation (and, for
seeds the choice never saw, test) metrics.

    python bench/drdc_variants.py --seed 0 --variant base16="" --variant base8="backbone.feature_stride=8" \
        [--set refiner.enabled=false] [--test] [--out bench/results/drdc_variants.json]

Each `--variant NAME=KEY=VALUE,KEY=VALUE` is the cpu profile plus `--set` overrides plus its own. Validation
metrics come from the calibrated model on the seed's validation split (normal training images, half with
pasted defects); `--test` also scores the test split (use it only on seeds whose results chose nothing).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.suite_data import SynthSpec, prepare  # noqa: E402
from dcad.core.config import load_config  # noqa: E402
from dcad.core.inference import evaluate  # noqa: E402
from dcad.train.pipeline import train_drdc  # noqa: E402

KEYS = ("image_auroc", "pixel_auroc", "aupro", "pixel_ap")


def parse_variant(text: str) -> tuple[str, list[str]]:
    name, _, rest = text.partition("=")
    return name, [item for item in rest.split(",") if item]


def synth_spec(size: int, args) -> SynthSpec:
    """The suite's synthetic data, optionally with more images per category (a larger validation split)."""
    return SynthSpec(size=size, n_train=args.n_train, n_test=args.n_test,
                     categories=tuple(args.categories) if args.categories else None)


def run_variant(name: str, overrides: list[str], args) -> dict:
    cfg = load_config(args.profile, None, [*args.set, *overrides, f"train.seed={args.seed}"])
    data = prepare(Path(args.cache), synth_spec(cfg.data.image_size, args), args.seed, cfg)
    start = time.perf_counter()
    model, val = train_drdc(cfg, data.splits, device=torch.device("cpu"))
    train_s = time.perf_counter() - start
    if args.save:
        from dcad.core.model.model_dir import save_model

        save_model(model, Path(args.save) / name)
    row = {"variant": name, "overrides": overrides, "seed": args.seed, "train_s": round(train_s, 1),
           "val": {k.removeprefix("val_"): round(v, 4) for k, v in val.items() if k.startswith("val_")}}
    if args.test:
        modes = ["full", "base_only"] if model.uses_refiner else ["base_only"]
        row["test"] = {}
        for mode in modes:
            model.cfg = model.cfg.model_copy(update={"ablation": model.cfg.ablation.model_copy(update={"mode": mode})})
            result = evaluate(model, data.splits.test, 32)
            row["test"][mode] = {k: round(float(result["mean"][k]), 4) for k in KEYS}
    return row


def rescore_variant(name: str, overrides: list[str], args) -> dict:
    """A saved model re-calibrated on validation under inference-time overrides (no retraining)."""
    from dcad.core.config import DCADConfig, apply_overrides, parse_override
    from dcad.core.model.model_dir import load_model
    from dcad.train.calibrate import calibrate

    model = load_model(args.model)
    data = apply_overrides(model.cfg.model_dump(mode="json"), dict(parse_override(o) for o in overrides))
    model.cfg = DCADConfig.from_dict(data, "--variant")
    splits = prepare(Path(args.cache), synth_spec(model.cfg.data.image_size, args), args.seed, model.cfg).splits
    start = time.perf_counter()
    calibrate(model, splits.val, 32, "cpu")
    mean = evaluate(model, splits.val, 32)["mean"]
    row = {"variant": name, "overrides": overrides, "seed": args.seed, "model": str(args.model),
           "rescore_s": round(time.perf_counter() - start, 1), "val": {k: round(float(mean[k]), 4) for k in KEYS}}
    if args.test:
        result = evaluate(model, splits.test, 32)
        row["test"] = {k: round(float(result["mean"][k]), 4) for k in KEYS}
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--profile", default="cpu")
    parser.add_argument("--variant", action="append", default=[], required=True)
    parser.add_argument("--set", action="append", default=[])
    parser.add_argument("--categories", nargs="*")
    parser.add_argument("--n-train", type=int, default=40, help="normal training images per category (validation "
                        "is carved from them: more images, a less noisy choice)")
    parser.add_argument("--n-test", type=int, default=30)
    parser.add_argument("--test", action="store_true")
    parser.add_argument("--model", help="re-score this saved model under each variant's overrides instead of training")
    parser.add_argument("--save", help="save each trained variant's model under SAVE/NAME")
    parser.add_argument("--cache", default=".dcad/bench-data")
    parser.add_argument("--out", default="bench/results/drdc_variants.json")
    args = parser.parse_args()
    out = Path(args.out)
    doc = json.loads(out.read_text()) if out.is_file() else {"rows": []}
    for text in args.variant:
        name, overrides = parse_variant(text)
        row = rescore_variant(name, overrides, args) if args.model else run_variant(name, overrides, args)
        print(json.dumps(row), flush=True)
        doc["rows"].append(row)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(doc, indent=1))


if __name__ == "__main__":
    main()
