"""Shared pytest fixtures (each group lives in its own module, imported here)."""

from fixtures_mlflow import decoy_global_store, tiny_dataset, trained  # noqa: F401
from fixtures_servers import direct_server, moto_endpoint, proxied_server  # noqa: F401
from fixtures_torch import one_torch_thread  # noqa: F401
