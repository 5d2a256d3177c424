"""Keep credentials out of what dcad writes or prints: the values of credential-like environment variables
(AWS keys and tokens, MLflow tokens and passwords, *SECRET*, *_TOKEN, *_PASSWORD, *_KEY) and URL passwords."""

from __future__ import annotations

import os
import re
from typing import Any, Mapping

MASK = "***"
MIN_SECRET_LENGTH = 8  # shorter values ("true", "none") would mask ordinary words
_SECRET_NAMES = re.compile(
    r"(^AWS_(ACCESS_KEY_ID|SECRET_ACCESS_KEY|SESSION_TOKEN|SECURITY_TOKEN)$)"
    r"|(^MLFLOW_TRACKING_(TOKEN|PASSWORD|USERNAME|CLIENT_CERT_PATH)$)"
    r"|(SECRET)|(TOKEN$)|(PASSWORD$)|(PASSWD$)|(_KEY$)|(_KEY_ID$)|(CREDENTIALS?$)",
    re.IGNORECASE,
)
_URL_USERINFO = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)(?P<userinfo>[^/@\s]+)@")


def is_secret_name(name: str) -> bool:
    """True for environment variable names that hold credentials."""
    return bool(_SECRET_NAMES.search(name))


def redact(text: str) -> str:
    """`text` with every secret value (longest first) and every URL password replaced by `***`."""
    if not text:
        return text
    secrets = {v for k, v in os.environ.items() if is_secret_name(k) and v and len(v) >= MIN_SECRET_LENGTH}
    for value in sorted(secrets, key=len, reverse=True):
        text = text.replace(value, MASK)
    return _URL_USERINFO.sub(lambda m: f"{m['scheme']}{MASK}@", text)


def redact_mapping(values: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of `values`: numbers, booleans and None as they are, anything else redacted as a string (keys are
    names, never secrets)."""
    return {k: v if v is None or isinstance(v, (bool, int, float)) else redact(str(v)) for k, v in values.items()}
