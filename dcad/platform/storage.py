"""S3 settings (endpoint, retries, checksums, boto3 client) and where a Ray run keeps its checkpoints: `--storage`
is a directory or `s3://bucket/prefix[?endpoint_override=URL&region=R]` (docs/cluster.md §4)."""

from __future__ import annotations

import functools
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

from dcad.platform.errors import PlatformError, describe
from dcad.platform.secrets import redact

ENDPOINT_ENVS = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "MLFLOW_S3_ENDPOINT_URL")  # first set wins
S3_MAX_ATTEMPTS = 10  # ~1.5 min of backoff before an S3 request fails
RETRY_ENV = {"AWS_RETRY_MODE": "standard", "AWS_MAX_ATTEMPTS": str(S3_MAX_ATTEMPTS)}
# boto3 >= 1.36 sends checksums that many S3-compatible stores reject (boto/boto3#4392)
CHECKSUM_ENV = {"AWS_REQUEST_CHECKSUM_CALCULATION": "when_required", "AWS_RESPONSE_CHECKSUM_VALIDATION": "when_required"}
QUERY_KEYS = ("endpoint_override", "region")
DEFAULT_REGION = "us-east-1"
S3_CONNECT_TIMEOUT_S = 5.0
S3_REQUEST_TIMEOUT_S = 30.0
PROBE_PREFIX = ".dcad-write-probe-"
COPY_CHUNK = 8 << 20


class StorageError(PlatformError):
    """The storage path cannot be parsed, reached or written."""


# ---- S3 settings ---------------------------------------------------------------------------------
def s3_endpoint() -> str | None:
    """The custom S3 endpoint from the environment (`ENDPOINT_ENVS`, first set wins); None: AWS."""
    return next((v.strip() for v in map(os.environ.get, ENDPOINT_ENVS) if v and v.strip()), None)


def max_attempts() -> int:
    """`AWS_MAX_ATTEMPTS` when the user set it, else `S3_MAX_ATTEMPTS`."""
    value = os.environ.get("AWS_MAX_ATTEMPTS", "")
    return int(value) if value.isdigit() and int(value) > 0 else S3_MAX_ATTEMPTS


def configure_s3_env() -> None:
    """Standard retries for every boto3 client in the process (MLflow's too) and, with a custom endpoint,
    checksums only when required; values the user set are kept."""
    for key, value in {**RETRY_ENV, **(CHECKSUM_ENV if s3_endpoint() else {})}.items():
        os.environ.setdefault(key, value)


def s3_client(endpoint_url: str | None = None, **credentials):
    """A boto3 S3 client for `endpoint_url` (default: `s3_endpoint()`) with path addressing and standard retries."""
    import boto3
    from botocore.config import Config

    config = Config(signature_version="s3v4", s3={"addressing_style": "path"}, request_checksum_calculation="when_required",
                    response_checksum_validation="when_required", retries={"mode": "standard", "max_attempts": max_attempts()})
    return boto3.client("s3", endpoint_url=endpoint_url or s3_endpoint(), config=config, **credentials)


def list_keys(client, bucket: str, prefix: str = "") -> list[str]:
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return [item["Key"] for page in pages for item in page.get("Contents", [])]


def s3_filesystem(endpoint: str | None, region: str = DEFAULT_REGION, attempts: int | None = None):
    """A pyarrow S3FileSystem for `endpoint` (None: AWS) with the environment's credentials and AWS's standard
    retries (`attempts`, default `max_attempts()`), kept where Ray unpickles it."""
    kwargs: dict[str, Any] = {"region": region, "connect_timeout": S3_CONNECT_TIMEOUT_S, "request_timeout": S3_REQUEST_TIMEOUT_S}
    if endpoint:
        parsed = urlparse(endpoint if "://" in endpoint else f"https://{endpoint}")
        if not parsed.hostname:
            raise StorageError(f"S3 endpoint {redact(endpoint)}: no host name")
        kwargs.update(scheme=parsed.scheme, endpoint_override=parsed.netloc.rsplit("@", 1)[-1])
    key, secret = os.environ.get("AWS_ACCESS_KEY_ID"), os.environ.get("AWS_SECRET_ACCESS_KEY")
    if key and secret:  # explicit, so Ray nodes without these variables can still write
        kwargs.update(access_key=key, secret_key=secret, session_token=os.environ.get("AWS_SESSION_TOKEN") or None)
    return _retrying_s3(attempts or max_attempts(), kwargs)


@functools.cache
def _retrying_s3_class():
    """pyarrow's S3FileSystem that keeps its retry strategy when pickled (a plain one reaches Ray's controller and
    workers with the SDK's default retries)."""
    import pyarrow.fs

    class RetryingS3FileSystem(pyarrow.fs.S3FileSystem):
        def __init__(self, attempts: int, options: dict[str, Any]) -> None:
            super().__init__(retry_strategy=pyarrow.fs.AwsStandardS3RetryStrategy(max_attempts=attempts), **options)
            self.dcad_args = (attempts, options)

        def __reduce__(self):
            return _retrying_s3, self.dcad_args

    return RetryingS3FileSystem


def _retrying_s3(attempts: int, options: dict[str, Any]):
    return _retrying_s3_class()(attempts, options)


# ---- checkpoint storage --------------------------------------------------------------------------
@dataclass(frozen=True)
class StorageLocation:
    """A resolved `--storage`: what Ray needs (`path`, `filesystem`) and what users may see (`describe()`)."""

    root: str  # /abs/dir or s3://bucket/prefix
    path: str  # Ray's storage_path: an absolute local path, or bucket/prefix for S3
    filesystem: Any = None  # pyarrow S3 filesystem (None for local paths)
    endpoint: str | None = None
    probe_filesystem: Any = None  # the same S3 store with one retry: the start-up check fails fast

    @property
    def is_s3(self) -> bool:
        return self.filesystem is not None

    def join(self, *parts: str) -> str:
        """A path below the storage root, in the filesystem's own notation."""
        return "/".join([self.path.rstrip("/"), *parts])

    def describe(self, *parts: str) -> str:
        """The root joined with `parts` and, for S3, the endpoint (credentials redacted), for messages."""
        where = "/".join([self.root.rstrip("/"), *parts])
        return f"{where} at {redact(self.endpoint)}" if self.endpoint else where

    def arrow_fs(self):
        """The pyarrow filesystem (a LocalFileSystem for local paths)."""
        import pyarrow.fs

        return self.filesystem if self.filesystem is not None else pyarrow.fs.LocalFileSystem()


def resolve_storage(spec: str | Path | None, default: Path) -> StorageLocation:
    """`spec` (a path or an s3:// URI) or, when None, the local `default` directory."""
    text = str(spec).strip() if spec is not None else ""
    parsed = urlparse(text)
    if parsed.scheme in ("", "file"):
        local = Path(parsed.path if parsed.scheme else text or default).expanduser().resolve()
        return StorageLocation(root=str(local), path=str(local))
    if parsed.scheme != "s3":
        raise StorageError(
            f"--storage {redact(text)}: unsupported scheme '{parsed.scheme}://' (use a directory or s3://bucket/prefix)")
    shown = f"s3://{parsed.netloc}{parsed.path}"
    if not parsed.netloc:
        raise StorageError(f"--storage {redact(text)}: no bucket (expected s3://bucket/prefix)")
    query = {k: v[-1] for k, v in parse_qs(parsed.query, keep_blank_values=True).items()}
    unknown = sorted(set(query) - set(QUERY_KEYS))
    if unknown:
        raise StorageError(f"--storage {shown}: unknown query parameter(s) {unknown} (allowed: {', '.join(QUERY_KEYS)})")
    endpoint = query.get("endpoint_override") or s3_endpoint()
    region = query.get("region") or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or DEFAULT_REGION
    return StorageLocation(root=shown.rstrip("/"), path=f"{parsed.netloc}/{parsed.path.strip('/')}".rstrip("/"),
                           filesystem=s3_filesystem(endpoint, region), endpoint=endpoint,
                           probe_filesystem=s3_filesystem(endpoint, region, attempts=2))


def check_writable(location: StorageLocation) -> None:
    """Create the root if needed and write then delete a probe file; StorageError naming the path if not."""
    fs = location.probe_filesystem or location.arrow_fs()
    probe = location.join(f"{PROBE_PREFIX}{uuid.uuid4().hex[:12]}")
    try:
        if not location.is_s3:
            Path(location.path).mkdir(parents=True, exist_ok=True)
        with fs.open_output_stream(probe) as out:
            out.write(b"dcad")
        fs.delete_file(probe)
    except (OSError, ValueError) as err:
        reason = err.strerror if isinstance(err, OSError) and err.strerror else describe(err)
        raise StorageError(f"--storage {location.describe()}: not writable ({reason})") from None


def read_text(location: StorageLocation, path: str) -> str | None:
    """A small text file from storage (None when missing or unreadable)."""
    try:
        with location.arrow_fs().open_input_stream(path) as stream:
            return stream.read().decode("utf-8")
    except (OSError, ValueError, UnicodeDecodeError):
        return None


def upload_file(fs, source: Path, destination: str) -> None:
    """One local file to `destination` on `fs` through an output stream: a failed upload raises and leaves no object
    (`pyarrow.fs.copy_files` returned normally from an upload whose connection was cut)."""
    with open(source, "rb") as src, fs.open_output_stream(destination) as dst:
        shutil.copyfileobj(src, dst, COPY_CHUNK)


def download_file(fs, source: str, destination: Path) -> None:
    with fs.open_input_stream(source) as src, open(destination, "wb") as dst:
        shutil.copyfileobj(src, dst, COPY_CHUNK)


def upload_directory(fs, source: Path, destination: str, last: str | None = None) -> None:
    """Every file below `source` to `destination` on `fs`, the file named `last` after the others (a reader that finds
    it finds the rest); raises on the first file that fails."""
    files = sorted(p for p in Path(source).rglob("*") if p.is_file())
    files.sort(key=lambda p: p.relative_to(source).as_posix() == last)
    fs.create_dir(destination, recursive=True)
    for path in files:
        relative = path.relative_to(source).as_posix()
        if "/" in relative and getattr(fs, "type_name", "") != "s3":
            fs.create_dir(f"{destination}/{relative.rsplit('/', 1)[0]}", recursive=True)
        upload_file(fs, path, f"{destination}/{relative}")
