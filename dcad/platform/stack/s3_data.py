"""The local stack's S3 objects kept on disk across `dcad stack down` / `up`.

moto_server keeps its buckets in memory. `down` copies every object of the stack's bucket into
`STATE_DIR/s3-data/BUCKET/KEY` (a mirror: files of deleted objects go too) before it stops the endpoint,
and `up` uploads the mirror into the fresh endpoint before the MLflow server starts, so the runs in the
database keep their artifacts, and `models:/NAME@ALIAS` loads after a restart. `down --purge` removes it.
What was written after the last `down` is lost if the endpoint itself dies (SIGKILL, a crash).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

DATA_DIR = "s3-data"
_PART = ".dcad-part"


def data_dir(state_dir: Path, bucket: str) -> Path:
    return state_dir / DATA_DIR / bucket


def _client(endpoint: str, credentials: dict[str, str]):
    from dcad.platform.s3 import s3_client

    return s3_client(endpoint, aws_access_key_id=credentials["AWS_ACCESS_KEY_ID"],
                     aws_secret_access_key=credentials["AWS_SECRET_ACCESS_KEY"], region_name=credentials["AWS_DEFAULT_REGION"])


def save_bucket(endpoint: str, bucket: str, credentials: dict[str, str], state_dir: Path) -> int:
    """Mirror the bucket into the state directory; returns the number of objects saved. Each file is
    downloaded beside its place and renamed, so an interrupted save leaves the previous copy whole."""
    from dcad.platform.s3 import list_keys

    client, root = _client(endpoint, credentials), data_dir(state_dir, bucket)
    keys = list_keys(client, bucket)
    for key in keys:
        target = root / key
        target.parent.mkdir(parents=True, exist_ok=True)
        part = target.with_name(target.name + _PART)
        client.download_file(bucket, key, str(part))
        os.replace(part, target)
    wanted = {root / key for key in keys}
    for path in [p for p in root.rglob("*") if p.is_file()] if root.is_dir() else []:
        if path not in wanted:
            path.unlink()
    return len(keys)


def restore_bucket(endpoint: str, bucket: str, credentials: dict[str, str], state_dir: Path) -> int:
    """Upload the saved mirror into the (empty) bucket; returns the number of objects restored."""
    root = data_dir(state_dir, bucket)
    if not root.is_dir():
        return 0
    client, count = _client(endpoint, credentials), 0
    for path in sorted(p for p in root.rglob("*") if p.is_file() and not p.name.endswith(_PART)):
        client.upload_file(str(path), bucket, path.relative_to(root).as_posix())
        count += 1
    return count


def purge(state_dir: Path) -> None:
    shutil.rmtree(state_dir / DATA_DIR, ignore_errors=True)
