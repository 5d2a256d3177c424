"""Where a distributed training run keeps its checkpoints: a local (or shared) directory, or S3.

`--storage` takes a path or `s3://bucket/prefix[?endpoint_override=URL&region=R]`. For S3 the
endpoint of an S3-compatible store (MinIO, moto) comes from the `endpoint_override` query, else
`AWS_ENDPOINT_URL_S3`, `AWS_ENDPOINT_URL` or `MLFLOW_S3_ENDPOINT_URL`; credentials come from the
environment (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`) and are handed to
pyarrow, which is what Ray uses for storage. Ray takes `storage_path="bucket/prefix"` (no scheme)
plus the `storage_filesystem`.

Credentials never enter `StorageLocation.display` or an error message (`StorageError` redacts).
"""

from __future__ import annotations

import os
import re
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

from dcad.platform.errors import PlatformError
from dcad.platform.secrets import redact

ENDPOINT_ENVS = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "MLFLOW_S3_ENDPOINT_URL")
QUERY_KEYS = ("endpoint_override", "region")
DEFAULT_REGION = "us-east-1"
S3_CONNECT_TIMEOUT_S = 5.0
S3_REQUEST_TIMEOUT_S = 30.0
PROBE_PREFIX = ".dcad-write-probe-"
COPY_CHUNK = 8 << 20


class StorageError(PlatformError):
    """The storage path cannot be parsed, reached or written."""


@dataclass(frozen=True)
class StorageLocation:
    """A resolved `--storage`: what Ray needs (`path`, `filesystem`) and what users may see (`display`)."""

    root: str  # /abs/dir or s3://bucket/prefix
    path: str  # Ray's storage_path: an absolute local path, or bucket/prefix for S3
    filesystem: Any = None  # pyarrow.fs.FileSystem for S3 (retrying an endpoint that is away), None for local paths
    endpoint: str | None = None
    probe_filesystem: Any = None  # the same S3 store with one retry: the start-up check fails fast

    @property
    def is_s3(self) -> bool:
        return self.filesystem is not None

    def join(self, *parts: str) -> str:
        """A path below the storage root, in the filesystem's own notation."""
        return "/".join([self.path.rstrip("/"), *parts])

    @property
    def display(self) -> str:
        """The location for messages: the root and, for S3, the endpoint (credentials redacted)."""
        return self.describe()

    def describe(self, *parts: str) -> str:
        """The root joined with `parts` (and the endpoint), for messages."""
        where = "/".join([self.root.rstrip("/"), *parts])
        return f"{where} at {redact(self.endpoint)}" if self.endpoint else where

    def arrow_fs(self):
        """The pyarrow filesystem (a LocalFileSystem for local paths)."""
        if self.filesystem is not None:
            return self.filesystem
        import pyarrow.fs

        return pyarrow.fs.LocalFileSystem()


def resolve_storage(spec: str | Path | None, default: Path) -> StorageLocation:
    """`spec` (a path or an s3:// URI) or, when None, the local `default` directory."""
    if spec is None or str(spec).strip() == "":
        return _local(Path(default))
    text = str(spec).strip()
    scheme = urlparse(text).scheme
    if scheme == "s3":
        return _s3(text)
    if scheme in ("", "file"):
        return _local(Path(urlparse(text).path if scheme == "file" else text))
    raise StorageError(f"--storage {redact(text)}: unsupported scheme '{scheme}://' (use a directory or s3://bucket/prefix)")


def _local(path: Path) -> StorageLocation:
    resolved = path.expanduser().resolve()
    return StorageLocation(root=str(resolved), path=str(resolved))


def _s3(uri: str) -> StorageLocation:
    parsed = urlparse(uri)
    shown = f"s3://{parsed.netloc}{parsed.path}"
    if not parsed.netloc:
        raise StorageError(f"--storage {redact(uri)}: no bucket (expected s3://bucket/prefix)")
    query = {k: v[-1] for k, v in parse_qs(parsed.query, keep_blank_values=True).items()}
    unknown = sorted(set(query) - set(QUERY_KEYS))
    if unknown:
        raise StorageError(f"--storage {shown}: unknown query parameter(s) {unknown} (allowed: {', '.join(QUERY_KEYS)})")
    endpoint = query.get("endpoint_override") or _endpoint_from_env()
    region = query.get("region") or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or DEFAULT_REGION
    fs = s3_filesystem(endpoint, region)
    path = f"{parsed.netloc}/{parsed.path.strip('/')}".rstrip("/")
    return StorageLocation(root=shown.rstrip("/"), path=path, filesystem=fs, endpoint=endpoint,
                           probe_filesystem=s3_filesystem(endpoint, region, attempts=2))


def _endpoint_from_env() -> str | None:
    for name in ENDPOINT_ENVS:
        value = os.environ.get(name, "").strip()
        if value:
            return value
    return None


def s3_filesystem(endpoint: str | None, region: str = DEFAULT_REGION, attempts: int | None = None):
    """A pyarrow S3FileSystem for `endpoint` (None: AWS) with the environment's credentials, retrying
    with AWS's standard strategy (`attempts`, default `s3.max_attempts()`), also where Ray unpickles it."""
    from dcad.platform.s3 import max_attempts

    kwargs: dict[str, Any] = {
        "region": region,
        "connect_timeout": S3_CONNECT_TIMEOUT_S,
        "request_timeout": S3_REQUEST_TIMEOUT_S,
    }
    if endpoint:
        parsed = urlparse(endpoint if "://" in endpoint else f"https://{endpoint}")
        if not parsed.hostname:
            raise StorageError(f"S3 endpoint {redact(endpoint)}: no host name")
        kwargs["scheme"] = parsed.scheme
        kwargs["endpoint_override"] = parsed.netloc.rsplit("@", 1)[-1]
    key, secret = os.environ.get("AWS_ACCESS_KEY_ID"), os.environ.get("AWS_SECRET_ACCESS_KEY")
    if key and secret:  # explicit, so Ray nodes without these variables can still write
        kwargs.update(access_key=key, secret_key=secret, session_token=os.environ.get("AWS_SESSION_TOKEN") or None)
    return _retrying_s3_class()(attempts or max_attempts(), kwargs)


_RETRYING_S3 = None


def _retrying_s3_class():
    """pyarrow's S3FileSystem, keeping its retry strategy and timeouts when pickled: Ray sends the run's
    filesystem to its controller and workers, and a plain S3FileSystem arrives there with the SDK's
    defaults (measured: a refused connection failed after 0.5 s instead of retrying)."""
    global _RETRYING_S3
    if _RETRYING_S3 is None:
        import pyarrow.fs

        class RetryingS3FileSystem(pyarrow.fs.S3FileSystem):
            def __init__(self, attempts: int, options: dict[str, Any]) -> None:
                strategy = pyarrow.fs.AwsStandardS3RetryStrategy(max_attempts=attempts)
                super().__init__(retry_strategy=strategy, **options)
                self.dcad_args = (attempts, options)

            def __reduce__(self):
                return _rebuild_retrying_s3, self.dcad_args

        _RETRYING_S3 = RetryingS3FileSystem
    return _RETRYING_S3


def _rebuild_retrying_s3(attempts: int, options: dict[str, Any]):
    return _retrying_s3_class()(attempts, options)


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
        raise StorageError(f"--storage {location.display}: not writable ({_reason(err)})") from None


_AWS_ERROR = re.compile(r"AWS Error (?P<code>\w+) during \w+ operation: (?P<msg>[^;(]*)")


def _reason(err: BaseException) -> str:
    """One short line: the AWS error code and message for S3, the OS reason for local paths."""
    text = str(err).strip() or type(err).__name__
    match = _AWS_ERROR.search(text)
    if match:
        text = f"{match['code']}: {match['msg'].strip()}"
    elif isinstance(err, OSError) and err.strerror:
        text = err.strerror
    return redact(" ".join(text.split()))[:300]


def read_text(location: StorageLocation, path: str) -> str | None:
    """A small text file from storage (None when missing or unreadable)."""
    try:
        with location.arrow_fs().open_input_stream(path) as stream:
            return stream.read().decode("utf-8")
    except (OSError, ValueError, UnicodeDecodeError):
        return None


def upload_file(fs, source: Path, destination: str) -> None:
    """One local file to `destination` on `fs`, through a pyarrow output stream: a failed upload raises (an
    S3 multipart upload is then never completed, so no object appears). `pyarrow.fs.copy_files` is not used:
    measured here, it returned normally from an upload whose connection was cut, and no object was written."""
    with open(source, "rb") as src, fs.open_output_stream(destination) as dst:
        shutil.copyfileobj(src, dst, COPY_CHUNK)


def download_file(fs, source: str, destination: Path) -> None:
    with fs.open_input_stream(source) as src, open(destination, "wb") as dst:
        shutil.copyfileobj(src, dst, COPY_CHUNK)


def upload_directory(fs, source: Path, destination: str, last: str | None = None) -> None:
    """Every file below `source` to the directory `destination` on `fs`, the file named `last` after all the
    others (a reader that finds it finds the rest). Raises on the first file that fails."""
    files = sorted(p for p in Path(source).rglob("*") if p.is_file())
    files.sort(key=lambda p: p.relative_to(source).as_posix() == last)
    fs.create_dir(destination, recursive=True)
    for path in files:
        relative = path.relative_to(source).as_posix()
        if "/" in relative and not is_s3_filesystem(fs):
            fs.create_dir(f"{destination}/{relative.rsplit('/', 1)[0]}", recursive=True)
        upload_file(fs, path, f"{destination}/{relative}")


def is_s3_filesystem(fs) -> bool:
    return getattr(fs, "type_name", "") == "s3"
