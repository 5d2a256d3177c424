"""A local stack without Docker: MLflow, an S3 endpoint (moto_server) and a Ray head on 127.0.0.1 (`dcad stack`)."""

from dcad.platform.stack.manager import choose_backend, down, status, up
from dcad.platform.stack.state import ServiceRecord, StackError, StackOptions, StackState

__all__ = ["ServiceRecord", "StackError", "StackOptions", "StackState", "choose_backend", "down", "status", "up"]
