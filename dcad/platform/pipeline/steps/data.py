"""`synth` and `check`: the dataset every later step reads."""

from __future__ import annotations

from pathlib import Path

from dcad.platform.pipeline.spec import CheckStep, SynthStep
from dcad.platform.pipeline.steps.context import StepContext, existing_dir


def run_synth(step: SynthStep, ctx: StepContext) -> dict:
    from dcad.core.data import open_dataset, synthesize

    out = Path(step.out)
    summary = synthesize(out, seed=step.seed, size=step.size, categories=step.categories, n_train=step.train,
                         n_test=step.test, overwrite=True)
    ctx.log(f"wrote {summary['images']} images under {out}")
    return {"data": str(out.resolve()), "digest": open_dataset(out).digest()}


def run_check(step: CheckStep, ctx: StepContext) -> dict:
    from dcad.core.data import check_dataset

    root = existing_dir(step.data, step.name, "data")
    summary = check_dataset(root, step.layout)
    totals = summary["totals"]
    ctx.log(f"{root}: {totals['categories']} categories, {totals['train']} train and "
            f"{totals['test_good'] + totals['test_anomalous']} test images, all readable")
    return {"data": str(root.resolve()), "digest": summary["digest"]}
