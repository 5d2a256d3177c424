"""Resolve `runs:/RUN_ID/model`, `models:/NAME@ALIAS`, `models:/NAME/VERSION` or `models:/MODEL_ID`
to a local dcad model directory (the `model_dir` artifact of the pyfunc model)."""

from __future__ import annotations

import atexit
import shutil
import tempfile
from pathlib import Path

from dcad.core.errors import ModelError
from dcad.core.model.model_dir import META_FILE
from dcad.platform.pyfunc_model import MODEL_DIR_ARTIFACT
from dcad.platform.errors import describe
from dcad.platform.secrets import redact
from dcad.platform.store import check_store, configure_client_env, resolve_tracking_uri, use_store

_DOWNLOADS: list[Path] = []


def _cleanup() -> None:
    for path in _DOWNLOADS:
        shutil.rmtree(path, ignore_errors=True)


atexit.register(_cleanup)


def download_model_dir(uri: str, tracking_uri: str | None = None, dst: Path | None = None) -> Path:
    """Download the MLflow model at `uri` and return its dcad model directory (ModelError if unusable)."""
    import mlflow.artifacts
    from mlflow.exceptions import MlflowException

    store = resolve_tracking_uri(tracking_uri)
    check_store(store)
    configure_client_env()
    if dst is None:
        dst = Path(tempfile.mkdtemp(prefix="dcad-model-"))
        _DOWNLOADS.append(dst)
    try:
        with use_store(store):
            local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(dst), tracking_uri=store))
    except MlflowException as err:
        raise ModelError(f"{uri}: cannot fetch the model from {redact(store)} ({_first_line(err)})") from None
    except OSError as err:  # e.g. S3 credentials or endpoint missing
        raise ModelError(f"{uri}: cannot download the model ({_first_line(err)})") from None
    return find_model_dir(local, uri)


def find_model_dir(root: Path, uri: str = "") -> Path:
    """The directory holding `dcad_model.json` inside a downloaded MLflow model."""
    preferred = root / "artifacts" / MODEL_DIR_ARTIFACT
    if (preferred / META_FILE).is_file():
        return preferred
    if (root / META_FILE).is_file():
        return root
    found = sorted(root.rglob(META_FILE))
    if not found:
        raise ModelError(f"{uri or root}: not a dcad model (no {META_FILE} in the MLflow model)")
    return found[0].parent


def _first_line(err: Exception) -> str:
    return describe(err)
