"""Declarative end-to-end pipelines (`pipelines/*.yaml`): data → train or sweep → evaluate → register → gated promotion.

    run = run_pipeline("pipelines/quickstart.yaml", resume=True, log=print)
"""

from dcad.platform.pipeline.errors import PipelineError
from dcad.platform.pipeline.runner import PipelineRun, StepOutcome, run_pipeline, work_dir_of
from dcad.platform.pipeline.load import load_pipeline
from dcad.platform.pipeline.spec import KINDS, PipelineSpec
from dcad.platform.pipeline.state import STATE_FILE, PipelineState

__all__ = [
    "KINDS", "STATE_FILE", "PipelineError", "PipelineRun", "PipelineSpec", "PipelineState", "StepOutcome",
    "load_pipeline", "run_pipeline", "work_dir_of",
]
