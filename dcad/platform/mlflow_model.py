"""A dcad model directory as an MLflow pyfunc model: the pyfunc class, logging it, and fetching it back by URI."""

from __future__ import annotations

import atexit
import base64
import os
import shutil
import tempfile
import warnings
from importlib import metadata
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException

from dcad import __version__
from dcad.core.errors import ModelError
from dcad.core.model.model_dir import META_FILE, load_model, read_metadata
from dcad.platform.errors import describe
from dcad.platform.mlflow_store import open_store, use_store
from dcad.platform.secrets import redact

MODEL_NAME = "model"
MODEL_DIR_ARTIFACT = "model_dir"  # the dcad model directory inside the MLflow model's artifacts
DEFAULT_BATCH_SIZE = 8  # the same as `dcad predict`
DEVICE_ENV = "DCAD_DEVICE"
CODE_FILE = Path(__file__).with_name("pyfunc_model.py")  # models-from-code: MLflow logs this file with the model
URI_PREFIXES = ("runs:/", "models:/")
RUNTIME_PACKAGES = ("mlflow", "torch", "torchvision", "timm", "diffusers", "safetensors", "numpy", "pandas", "pillow",
                    "pyyaml", "pydantic", "scipy", "scikit-image", "matplotlib")
COLUMNS = ["score", "normalized_score", "decision", "category", "anomaly_map"]


class DcadPyfuncModel(mlflow.pyfunc.PythonModel):
    """Loads the dcad model directory from the MLflow model's artifacts and scores images like `dcad predict`."""

    def load_context(self, context) -> None:
        self.model = load_model(context.artifacts[MODEL_DIR_ARTIFACT], os.environ.get(DEVICE_ENV, "cpu"))

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        # A DataFrame hint tells MLflow to validate with the logged signature, not with type hints.
        frame = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
        if "image" not in frame.columns:
            raise ValueError("input needs an 'image' column of encoded image bytes (base64 in JSON)")
        categories = [c if isinstance(c, str) and c else None for c in frame.get("category", [None] * len(frame))]
        batch_size = int((params or {}).get("batch_size") or DEFAULT_BATCH_SIZE)
        return score_images(self.model, decode_images(list(frame["image"])), categories, batch_size)


def decode_images(blobs: list) -> list[np.ndarray]:
    """Encoded image bytes (or base64 text) -> uint8 HxWx3 arrays, read as `dcad predict` reads files."""
    from dcad.core.data.images import load_image

    arrays = []
    with tempfile.TemporaryDirectory(prefix="dcad-pyfunc-") as tmp:
        for i, blob in enumerate(blobs):
            blob = base64.b64decode(blob) if isinstance(blob, str) else blob
            if not isinstance(blob, (bytes, bytearray)):
                raise ValueError(f"row {i}: 'image' must be encoded image bytes, got {type(blob).__name__}")
            path = Path(tmp) / f"{i}.img"
            path.write_bytes(blob)
            arrays.append(load_image(path))
    return arrays


def score_images(model, images: list[np.ndarray], categories: list[str | None], batch_size: int) -> pd.DataFrame:
    """`predict_arrays` over consecutive chunks of at most `batch_size` images of one category (order kept)."""
    from dcad.core.predict import predict_arrays

    rows, start = [], 0
    for stop in range(1, len(images) + 1):
        if stop < len(images) and categories[stop] == categories[start] and stop - start < batch_size:
            continue
        result = predict_arrays(model, images[start:stop], categories[start])
        rows += [[float(result.scores[i]), float(result.normalized_scores[i]), bool(result.decisions[i]),
                  result.categories[i], result.anomaly_maps[i].tolist()] for i in range(stop - start)]
        start = stop
    return pd.DataFrame(rows, columns=COLUMNS)


def pip_requirements() -> list[str]:
    """Pinned requirements of the runtime packages (dcad itself included), skipping MLflow's slow inference."""
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
    outputs = Schema([ColSpec("double", "score"), ColSpec("double", "normalized_score"), ColSpec("boolean", "decision"),
                      ColSpec("string", "category"), ColSpec(Array(Array("float")), "anomaly_map")])
    params = ParamSchema([ParamSpec("batch_size", "long", DEFAULT_BATCH_SIZE)])
    return ModelSignature(inputs=inputs, outputs=outputs, params=params)


def log_pyfunc_model(model_dir: Path):
    """Log `model_dir` (without `checkpoints/`) into the active run; returns MLflow's ModelInfo."""
    meta = read_metadata(model_dir)
    keys = ("dcad_version", "categories", "image_size", "image_threshold", "pixel_threshold")
    with tempfile.TemporaryDirectory(prefix="dcad-stage-") as tmp, warnings.catch_warnings():
        staged = Path(tmp) / "model_dir"
        shutil.copytree(model_dir, staged, ignore=shutil.ignore_patterns("checkpoints", ".*"))
        warnings.filterwarnings("ignore", message=".*(input example|type hints).*")
        return mlflow.pyfunc.log_model(
            name=MODEL_NAME, python_model=str(CODE_FILE), artifacts={MODEL_DIR_ARTIFACT: str(staged)},
            signature=model_signature(), pip_requirements=pip_requirements(), metadata={k: meta.get(k) for k in keys},
            tags={"dcad.dataset_digest": str(meta.get("dataset_digest", ""))},
        )


def resolve_model_dir(model: str, tracking_uri: str | None = None) -> Path:
    """A local model directory as is; the dcad model directory of `runs:/…` or `models:/…`, downloaded to a temporary
    directory (ModelError if unusable)."""
    if not model.startswith(URI_PREFIXES):
        return Path(model)
    store, _ = open_store(tracking_uri)
    dst = tempfile.mkdtemp(prefix="dcad-model-")
    atexit.register(shutil.rmtree, dst, ignore_errors=True)
    try:
        with use_store(store):
            local = Path(mlflow.artifacts.download_artifacts(artifact_uri=model, dst_path=dst, tracking_uri=store))
    except MlflowException as err:
        raise ModelError(f"{model}: cannot fetch the model from {redact(store)} ({describe(err)})") from None
    except OSError as err:  # e.g. S3 credentials or endpoint missing
        raise ModelError(f"{model}: cannot download the model ({describe(err)})") from None
    return find_model_dir(local, model)


def find_model_dir(root: Path, uri: str) -> Path:
    """The shallowest directory holding `dcad_model.json` inside a downloaded MLflow model."""
    found = min(root.rglob(META_FILE), key=lambda path: len(path.parts), default=None)
    if found is None:
        raise ModelError(f"{uri}: not a dcad model (no {META_FILE} in the MLflow model)")
    return found.parent
