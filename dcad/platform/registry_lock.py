"""One writer at a time per registered model: a lock that every process sharing the store sees.

Two `dcad promote` of one model at once, or a promotion while a sweep registers its best, would each
read the alias holder, decide, and write: the second gate would be decided against a champion that is no
longer current, and read-modify-write tags (the alias history) would lose an entry. `model_lock(name)`
serialises them with the one create-if-absent the MLflow API offers: creating a registered model, which
the store refuses when the name exists (a unique key in its database). The lock is the registered model
`NAME.dcad-lock`, deleted when the holder is done; one older than `STALE_S` (a holder killed with the lock)
is broken by the next writer. `dcad models list` does not show locks.
"""

from __future__ import annotations

import os
import socket
import time
from contextlib import contextmanager
from typing import Iterator

from dcad.platform.errors import RegistryError

SUFFIX = ".dcad-lock"
KIND_TAG = "dcad.lock_of"
STALE_S = 600.0
WAIT_S = 300.0


def lock_name(name: str) -> str:
    return f"{name}{SUFFIX}"


def is_lock(model) -> bool:
    return KIND_TAG in (model.tags or {}) or model.name.endswith(SUFFIX)


@contextmanager
def model_lock(client, name: str, wait_s: float = WAIT_S, log=None) -> Iterator[None]:
    """Hold the write lock of registered model `name` inside the block (RegistryError after `wait_s`)."""
    lock = lock_name(name)
    deadline, told = time.monotonic() + wait_s, False
    while not _try_create(client, lock, name):
        holder = _holder(client, lock)
        if holder is not None and time.time() - holder[1] > STALE_S:
            _delete(client, lock)  # its holder died with it
            continue
        if time.monotonic() >= deadline:
            who = f"{holder[0]} since {time.strftime('%H:%M:%S', time.localtime(holder[1]))}" if holder else "another writer"
            raise RegistryError(f"registered model '{name}' is being changed by {who}; try again, or delete the "
                                f"registered model '{lock}' if that process is gone")
        if log is not None and not told:
            log(f"registered model '{name}' is being changed by another process: waiting for it")
            told = True
        time.sleep(0.2)
    try:
        yield
    finally:
        _delete(client, lock)


def _try_create(client, lock: str, name: str) -> bool:
    from mlflow.exceptions import MlflowException

    tags = {KIND_TAG: name, "dcad.lock.owner": f"{socket.gethostname()}:{os.getpid()}", "dcad.lock.at": f"{time.time():.3f}"}
    try:
        client.create_registered_model(lock, tags=tags, description=f"dcad write lock of '{name}' (deleted when done)")
        return True
    except MlflowException as err:
        if "already exists" in str(err).lower() or getattr(err, "error_code", "") == "RESOURCE_ALREADY_EXISTS":
            return False
        raise


def _holder(client, lock: str) -> tuple[str, float] | None:
    from mlflow.exceptions import MlflowException

    try:
        tags = client.get_registered_model(lock).tags or {}
    except MlflowException:
        return None  # released meanwhile
    try:
        return tags.get("dcad.lock.owner", "?"), float(tags.get("dcad.lock.at", "0"))
    except ValueError:
        return tags.get("dcad.lock.owner", "?"), 0.0


def _delete(client, lock: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        client.delete_registered_model(lock)
    except MlflowException:
        pass  # already gone (broken as stale by another writer)
