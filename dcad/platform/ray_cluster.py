"""Connecting to a Ray cluster and checking, before training starts, that it can hold the workers.

Without these checks Ray waits: an unreachable address retries for a long time, and a worker group
larger than the cluster sits in "Attempting to start training worker group" until a timeout. Both
become one `ClusterError` line that says what is available. A run whose cluster shrinks under it (a node
lost) is told so by `CapacityWatch`, since Ray Train then waits for room without a word.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from dataclasses import dataclass
from urllib.parse import urlparse

from dcad.platform.errors import PlatformError

CONNECT_TIMEOUT_S = 5.0
WATCH_INTERVAL_S = 5.0  # how often a running training checks that its workers still fit the cluster
# Non-secret settings the workers need to find the same caches and stores as the driver (a Ray
# cluster's nodes do not inherit the driver's environment). Credentials are never forwarded here.
FORWARDED_ENV = (
    "HF_HOME",
    "HF_HUB_CACHE",
    "HF_HUB_OFFLINE",
    "TORCH_HOME",
    "DCAD_HOME",
    "MLFLOW_TRACKING_URI",
    "MLFLOW_S3_ENDPOINT_URL",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_REQUEST_CHECKSUM_CALCULATION",
    "AWS_RESPONSE_CHECKSUM_VALIDATION",
)


# Ray Train settings for every process of the job: print() in workers once (not also through Train's
# logger, which doubles each line in the driver's log).
RAY_TRAIN_ENV = {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}
# Loggers that repeat a warning every few seconds when the state API is missing (Ray without the
# dashboard extras), which buries the training log; they are set to ERROR in every worker process.
NOISY_LOGGERS = ("ray.train.v2._internal.execution.controller.placement_group_cleaner",)


class ClusterError(PlatformError):
    """The Ray cluster cannot be reached or cannot hold the requested workers."""


@dataclass(frozen=True)
class WorkerShape:
    """The resources of one training worker."""

    cpus: float
    gpus: float = 0.0

    def describe(self, workers: int) -> str:
        need = f"{workers * self.cpus:g} CPU"
        if self.gpus:
            need += f" and {workers * self.gpus:g} GPU"
        return f"{workers} worker(s) × ({self.cpus:g} CPU" + (f", {self.gpus:g} GPU)" if self.gpus else ")") + f" = {need}"


@dataclass(frozen=True)
class NodeCapacity:
    cpus: float
    gpus: float


def forwarded_env() -> dict[str, str]:
    return {**{name: os.environ[name] for name in FORWARDED_ENV if os.environ.get(name)}, **RAY_TRAIN_ENV}


def quiet_worker_logs() -> None:
    """`worker_process_setup_hook` of the job: silence the loggers in NOISY_LOGGERS."""
    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)


def connect(address: str | None) -> str:
    """Join the cluster at `address` ("auto": the running one; None: start a local Ray). Returns a description."""
    import ray

    if ray.is_initialized():
        return _describe(address)
    if address not in (None, "", "auto", "local"):
        check_reachable(address)
    try:
        ray.init(
            address=address or None,
            log_to_driver=True,
            logging_level=logging.WARNING,
            runtime_env={
                "env_vars": forwarded_env(),
                "worker_process_setup_hook": f"{__name__}.quiet_worker_logs",
            },
        )
    except (ConnectionError, RuntimeError, ValueError, TimeoutError) as err:
        raise ClusterError(f"--address {address}: cannot connect to a Ray cluster ({_first_line(err)})") from None
    return _describe(address)


def _describe(address: str | None) -> str:
    return f"Ray cluster at {address}" if address and address != "local" else "a local Ray instance"


def check_reachable(address: str, timeout: float = CONNECT_TIMEOUT_S) -> None:
    """A TCP connection to the GCS address (`host:port` or `ray://host:port`), or a ClusterError."""
    parsed = urlparse(address if "://" in address else f"ray://{address}")
    try:
        host, port = parsed.hostname, parsed.port
    except ValueError:
        host, port = None, None
    if not host or not port:
        raise ClusterError(f"--address {address}: expected HOST:PORT (e.g. 127.0.0.1:6379), 'auto' or 'ray://HOST:PORT'")
    try:
        with socket.create_connection((host, port), timeout=timeout):
            pass
    except OSError as err:
        reason = err.strerror or type(err).__name__
        raise ClusterError(f"--address {address}: no Ray cluster reachable at {host}:{port} ({reason})") from None


def cluster_nodes() -> list[NodeCapacity]:
    """CPU and GPU totals of the alive nodes of the connected cluster."""
    import ray

    nodes = []
    for node in ray.nodes():
        if node.get("Alive"):
            res = node.get("Resources", {})
            nodes.append(NodeCapacity(float(res.get("CPU", 0.0)), float(res.get("GPU", 0.0))))
    return nodes


def fits(workers: int, shape: WorkerShape, nodes: list[NodeCapacity]) -> bool:
    """Whether `workers` of `shape` fit the nodes, each worker on one node."""
    free = sorted(([n.cpus, n.gpus] for n in nodes), reverse=True)
    for _ in range(workers):
        slot = next((f for f in free if f[0] + 1e-9 >= shape.cpus and f[1] + 1e-9 >= shape.gpus), None)
        if slot is None:
            return False
        slot[0] -= shape.cpus
        slot[1] -= shape.gpus
    return True


def check_capacity(workers: int, shape: WorkerShape, nodes: list[NodeCapacity], where: str) -> None:
    """ClusterError unless `workers` of `shape` fit the nodes (each worker on one node)."""
    if not fits(workers, shape, nodes):
        raise ClusterError(f"{shape.describe(workers)} do not fit {where}: it has {inventory(nodes)}; "
                           "lower --workers, --cpus-per-worker or --gpus-per-worker")


def inventory(nodes: list[NodeCapacity]) -> str:
    cpus = sum(n.cpus for n in nodes)
    gpus = sum(n.gpus for n in nodes)
    per_node = ", ".join(f"{n.cpus:g} CPU/{n.gpus:g} GPU" for n in nodes)
    return f"{cpus:g} CPU and {gpus:g} GPU on {len(nodes)} node(s) ({per_node})"


class CapacityWatch:
    """While a Ray Train run goes on, says once when its workers stop fitting the cluster (a node lost: Ray
    Train then waits for room, retrying every minute, without a word) and once when they fit again."""

    def __init__(self, workers: int, shape: WorkerShape, where: str, log, interval_s: float = WATCH_INTERVAL_S) -> None:
        self.workers, self.shape, self.where, self.log, self.interval_s = workers, shape, where, log, interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="dcad-capacity-watch", daemon=True)

    def __enter__(self) -> "CapacityWatch":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=self.interval_s + 5)

    def _watch(self) -> None:
        fitted = True
        while not self._stop.wait(self.interval_s):
            try:
                nodes = cluster_nodes()
            except Exception:  # noqa: BLE001 - the GCS is away for a moment; Ray Train reports its own failures
                continue
            now = fits(self.workers, self.shape, nodes)
            if now == fitted:
                continue
            fitted = now
            if not now:
                self.log(f"waiting: {self.shape.describe(self.workers)} no longer fit {self.where}, which has "
                         f"{inventory(nodes)}; Ray Train starts them again from the last checkpoint when a node "
                         "joins (Ctrl-C stops; the same command resumes)")
            else:
                self.log(f"{self.where} has room again ({inventory(nodes)}): the workers restart from the last checkpoint")


def _first_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return (lines[0] if lines else type(err).__name__)[:300]
