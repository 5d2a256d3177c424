"""S3 and S3-compatible stores (MinIO, moto): endpoint, checksums, and a configured boto3 client.

boto3 >= 1.36 sends checksums by default, which many S3-compatible stores reject
(boto/boto3#4392); with a custom endpoint we switch both directions to `when_required`.
"""

from __future__ import annotations

import os
from urllib.parse import urlparse

ENDPOINT_ENV = "MLFLOW_S3_ENDPOINT_URL"
CHECKSUM_ENV = {
    "AWS_REQUEST_CHECKSUM_CALCULATION": "when_required",
    "AWS_RESPONSE_CHECKSUM_VALIDATION": "when_required",
}


def s3_endpoint() -> str | None:
    """The custom S3 endpoint MLflow uses (`MLFLOW_S3_ENDPOINT_URL`, else `AWS_ENDPOINT_URL_S3`)."""
    return os.environ.get(ENDPOINT_ENV) or os.environ.get("AWS_ENDPOINT_URL_S3") or None


def configure_s3_env() -> None:
    """With a custom endpoint, default the boto3 checksum settings to `when_required`."""
    if s3_endpoint():
        for key, value in CHECKSUM_ENV.items():
            os.environ.setdefault(key, value)


def split_s3_uri(uri: str) -> tuple[str, str]:
    """`s3://bucket/some/prefix` -> ("bucket", "some/prefix")."""
    parsed = urlparse(uri)
    if parsed.scheme != "s3" or not parsed.netloc:
        raise ValueError(f"not an s3:// URI: {uri}")
    return parsed.netloc, parsed.path.lstrip("/")


def s3_client(endpoint_url: str | None = None, **credentials):
    """A boto3 S3 client for `endpoint_url` (default: the configured endpoint) with path addressing."""
    import boto3
    from botocore.config import Config

    config = Config(
        signature_version="s3v4",
        s3={"addressing_style": "path"},
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
    )
    return boto3.client("s3", endpoint_url=endpoint_url or s3_endpoint(), config=config, **credentials)


def list_keys(client, bucket: str, prefix: str = "") -> list[str]:
    """Every object key under `prefix` (paginated)."""
    keys: list[str] = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        keys.extend(item["Key"] for item in page.get("Contents", []))
    return keys
