"""S3 and S3-compatible stores (MinIO, moto): endpoint, checksums, retries, and a configured boto3 client.

boto3 >= 1.36 sends checksums by default, which many S3-compatible stores reject
(boto/boto3#4392); with a custom endpoint we switch both directions to `when_required`.

An endpoint that refuses connections for a while (a restarting MinIO) is retried by the SDKs themselves:
botocore's `standard` retry mode (exponential backoff with jitter, connection errors and 5xx included)
with `S3_MAX_ATTEMPTS` attempts, for our clients and, through `AWS_RETRY_MODE`/`AWS_MAX_ATTEMPTS`,
MLflow's; pyarrow's `AwsStandardS3RetryStrategy` for the Ray storage filesystem (`storage.py`).
"""

from __future__ import annotations

import os

ENDPOINT_ENV = "MLFLOW_S3_ENDPOINT_URL"
CHECKSUM_ENV = {
    "AWS_REQUEST_CHECKSUM_CALCULATION": "when_required",
    "AWS_RESPONSE_CHECKSUM_VALIDATION": "when_required",
}


S3_MAX_ATTEMPTS = 10  # ~1.5 min of backoff before an upload fails
RETRY_ENV = {"AWS_RETRY_MODE": "standard", "AWS_MAX_ATTEMPTS": str(S3_MAX_ATTEMPTS)}


def max_attempts() -> int:
    """`AWS_MAX_ATTEMPTS` when the user set it, else `S3_MAX_ATTEMPTS`."""
    value = os.environ.get("AWS_MAX_ATTEMPTS", "")
    return int(value) if value.isdigit() and int(value) > 0 else S3_MAX_ATTEMPTS


def s3_endpoint() -> str | None:
    """The custom S3 endpoint MLflow uses (`MLFLOW_S3_ENDPOINT_URL`, else `AWS_ENDPOINT_URL_S3`)."""
    return os.environ.get(ENDPOINT_ENV) or os.environ.get("AWS_ENDPOINT_URL_S3") or None


def configure_s3_env() -> None:
    """Standard retries for every boto3 client in the process (MLflow's too); with a custom endpoint, the
    checksum settings default to `when_required`. Values the user set are kept."""
    for key, value in RETRY_ENV.items():
        os.environ.setdefault(key, value)
    if s3_endpoint():
        for key, value in CHECKSUM_ENV.items():
            os.environ.setdefault(key, value)


def s3_client(endpoint_url: str | None = None, **credentials):
    """A boto3 S3 client for `endpoint_url` (default: the configured endpoint) with path addressing."""
    import boto3
    from botocore.config import Config

    config = Config(
        signature_version="s3v4",
        s3={"addressing_style": "path"},
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
        retries={"mode": "standard", "max_attempts": max_attempts()},
    )
    return boto3.client("s3", endpoint_url=endpoint_url or s3_endpoint(), config=config, **credentials)


def list_keys(client, bucket: str, prefix: str = "") -> list[str]:
    """Every object key under `prefix` (paginated)."""
    keys: list[str] = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        keys.extend(item["Key"] for item in page.get("Contents", []))
    return keys
