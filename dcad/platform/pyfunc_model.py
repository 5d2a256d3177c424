"""The MLflow pyfunc form of a dcad model: what `mlflow models serve` and `mlflow.pyfunc.load_model` run.

The logged model carries the dcad model directory (weights, thresholds, normalisation statistics,
categories, config) as the artifact `model_dir`; `checkpoints/` is left out. Scoring calls
`dcad.core.predict.predict_arrays`, the function `dcad predict` uses, so both agree by construction.

Input: a DataFrame with `image` (encoded image bytes: PNG, JPEG, BMP, TIFF; base64 in JSON requests)
and an optional `category` (a category the model knows; predicted from the image when missing).
Output: one row per image: `score`, `normalized_score` (threshold -> 0.5), `decision` (True =
anomalous), `category`, `anomaly_map` (S x S floats at the model's resolution).
"""


import os
import tempfile
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd

MODEL_DIR_ARTIFACT = "model_dir"
DEFAULT_BATCH_SIZE = 8  # the same as `dcad predict`
DEVICE_ENV = "DCAD_DEVICE"


class DcadPyfuncModel(mlflow.pyfunc.PythonModel):
    """Loads the dcad model directory from the MLflow model's artifacts and scores images."""

    def load_context(self, context) -> None:
        from dcad.core.model.model_dir import load_model

        self.model = load_model(context.artifacts[MODEL_DIR_ARTIFACT], os.environ.get(DEVICE_ENV, "cpu"))

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        # A DataFrame hint tells MLflow to validate with the logged signature, not with type hints.
        frame = _as_frame(model_input)
        batch_size = int((params or {}).get("batch_size") or DEFAULT_BATCH_SIZE)
        images = decode_images(list(frame["image"]))
        return score_images(self.model, images, _categories(frame), batch_size)


def _as_frame(model_input) -> pd.DataFrame:
    frame = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
    if "image" not in frame.columns:
        raise ValueError("input needs an 'image' column of encoded image bytes (base64 in JSON)")
    return frame


def _categories(frame: pd.DataFrame) -> list[str | None]:
    if "category" not in frame.columns:
        return [None] * len(frame)
    return [c if isinstance(c, str) and c else None for c in frame["category"]]


def decode_images(blobs: list) -> list[np.ndarray]:
    """Encoded image bytes -> uint8 HxWx3 arrays, decoded by the same reader as `dcad predict`."""
    from dcad.core.data.images import load_image

    arrays = []
    with tempfile.TemporaryDirectory(prefix="dcad-pyfunc-") as tmp:
        for i, blob in enumerate(blobs):
            if isinstance(blob, str):  # a base64 string that schema enforcement left undecoded
                import base64

                blob = base64.b64decode(blob)
            if not isinstance(blob, (bytes, bytearray)):
                raise ValueError(f"row {i}: 'image' must be encoded image bytes, got {type(blob).__name__}")
            path = Path(tmp) / f"{i}.img"
            path.write_bytes(blob)
            arrays.append(load_image(path))
    return arrays


def score_images(model, images: list[np.ndarray], categories: list[str | None], batch_size: int) -> pd.DataFrame:
    """predict_arrays over consecutive chunks of images that share a category (order kept)."""
    from dcad.core.predict import predict_arrays

    rows: list[dict] = []
    for start, stop, category in _runs(categories, batch_size):
        result = predict_arrays(model, images[start:stop], category)
        for i in range(stop - start):
            rows.append(
                {
                    "score": float(result.scores[i]),
                    "normalized_score": float(result.normalized_scores[i]),
                    "decision": bool(result.decisions[i]),
                    "category": result.categories[i],
                    "anomaly_map": result.anomaly_maps[i].tolist(),
                }
            )
    return pd.DataFrame(rows, columns=["score", "normalized_score", "decision", "category", "anomaly_map"])


def _runs(categories: list[str | None], batch_size: int) -> list[tuple[int, int, str | None]]:
    """Split row indices into (start, stop, category) chunks of at most `batch_size` equal categories."""
    runs: list[tuple[int, int, str | None]] = []
    start = 0
    for i in range(1, len(categories) + 1):
        if i == len(categories) or categories[i] != categories[start] or i - start == batch_size:
            runs.append((start, i, categories[start]))
            start = i
    return runs
