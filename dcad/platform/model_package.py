"""Logging a dcad model directory as an MLflow pyfunc model (models-from-code + the directory as artifact)."""

from __future__ import annotations

import shutil
import tempfile
import warnings
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Iterator

from dcad import __version__
from dcad.core.model.model_dir import read_metadata
from dcad.platform.pyfunc_model import DEFAULT_BATCH_SIZE, MODEL_DIR_ARTIFACT

MODEL_NAME = "model"
EXCLUDED = {"checkpoints"}  # resumable training state: large and useless for serving
ENTRY_POINT = Path(__file__).with_name("pyfunc_entry.py")
# What the pyfunc model imports at load time (dcad's core, its model libraries, MLflow itself).
RUNTIME_PACKAGES = (
    "mlflow",
    "torch",
    "torchvision",
    "timm",
    "diffusers",
    "safetensors",
    "numpy",
    "pandas",
    "pillow",
    "pyyaml",
    "pydantic",
    "scipy",
    "scikit-image",
    "matplotlib",
)


def pip_requirements() -> list[str]:
    """Explicit, pinned requirements (avoids MLflow's slow inference; dcad itself is listed too)."""
    pins = []
    for name in RUNTIME_PACKAGES:
        try:
            pins.append(f"{name}=={metadata.version(name)}")
        except metadata.PackageNotFoundError:
            pins.append(name)
    return [*pins, f"dcad=={__version__}"]


def model_signature():
    """Images in; scores, normalised scores, decisions, categories and anomaly maps out."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Array, ColSpec, ParamSchema, ParamSpec, Schema

    inputs = Schema([ColSpec("binary", "image"), ColSpec("string", "category", required=False)])
    outputs = Schema(
        [
            ColSpec("double", "score"),
            ColSpec("double", "normalized_score"),
            ColSpec("boolean", "decision"),
            ColSpec("string", "category"),
            ColSpec(Array(Array("float")), "anomaly_map"),
        ]
    )
    params = ParamSchema([ParamSpec("batch_size", "long", DEFAULT_BATCH_SIZE)])
    return ModelSignature(inputs=inputs, outputs=outputs, params=params)


@contextmanager
def staged_model_dir(model_dir: Path) -> Iterator[Path]:
    """A temporary copy of the model directory without `checkpoints/` (validated first)."""
    read_metadata(model_dir)
    with tempfile.TemporaryDirectory(prefix="dcad-stage-") as tmp:
        staged = Path(tmp) / "model_dir"
        shutil.copytree(model_dir, staged, ignore=lambda _d, names: [n for n in names if n in EXCLUDED or n.startswith(".")])
        yield staged


def log_pyfunc_model(model_dir: Path, step: int = 0):
    """Log `model_dir` into the active MLflow run; returns MLflow's ModelInfo (model_id, model_uri)."""
    import mlflow

    meta = read_metadata(model_dir)
    with staged_model_dir(model_dir) as staged, warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*(input example|type hints).*")
        return mlflow.pyfunc.log_model(
            name=MODEL_NAME,
            python_model=str(ENTRY_POINT),
            artifacts={MODEL_DIR_ARTIFACT: str(staged)},
            signature=model_signature(),
            pip_requirements=pip_requirements(),
            metadata={
                "dcad_version": meta.get("dcad_version"),
                "categories": meta.get("categories"),
                "image_size": meta.get("image_size"),
                "image_threshold": meta.get("image_threshold"),
                "pixel_threshold": meta.get("pixel_threshold"),
            },
            tags={"dcad.dataset_digest": str(meta.get("dataset_digest", ""))},
            step=step,
        )
