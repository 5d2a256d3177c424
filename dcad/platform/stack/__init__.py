"""A local stack without Docker: MLflow (PostgreSQL or sqlite backend, artifacts proxied to S3), an S3 endpoint
(moto_server) and a Ray head on 127.0.0.1, started by `dcad stack up` and stopped by `dcad stack down`."""

from dcad.platform.stack.errors import StackError
from dcad.platform.stack.manager import ServiceStatus, StackOptions, choose_backend, default_state_dir, down, status, up
from dcad.platform.stack.state import ServiceRecord, StackState

__all__ = [
    "ServiceRecord", "ServiceStatus", "StackError", "StackOptions", "StackState",
    "choose_backend", "default_state_dir", "down", "status", "up",
]
