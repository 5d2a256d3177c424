"""Keep credentials out of everything dcad writes or prints: params, tags, artifacts, error messages.

Secrets are the values of credential-like environment variables (AWS keys and session tokens,
MLflow tokens and passwords, anything named *_SECRET*, *_TOKEN, *_PASSWORD, *_KEY) and the
password part of URLs (`http://user:pass@host`). `redact` replaces each with `***`.
"""

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


def secret_values(environ: Mapping[str, str] | None = None) -> list[str]:
    """Values of credential-like variables, longest first (so a secret containing another is masked whole)."""
    env = os.environ if environ is None else environ
    values = {v for k, v in env.items() if is_secret_name(k) and v and len(v) >= MIN_SECRET_LENGTH}
    return sorted(values, key=len, reverse=True)


def redact(text: str, environ: Mapping[str, str] | None = None) -> str:
    """`text` with every secret value and every URL password replaced by `***`."""
    if not text:
        return text
    for value in secret_values(environ):
        text = text.replace(value, MASK)
    return _URL_USERINFO.sub(lambda m: f"{m['scheme']}{MASK}@", text)


def redact_value(value: Any) -> Any:
    """Redact strings; leave numbers, booleans and None as they are; stringify anything else."""
    if value is None or isinstance(value, (bool, int, float)):
        return value
    return redact(str(value))


def redact_mapping(values: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of `values` with each value redacted (keys are names, never secrets)."""
    return {key: redact_value(value) for key, value in values.items()}
