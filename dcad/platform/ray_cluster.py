"""Joining a Ray cluster and checking that it can hold the workers, before and (`CapacityWatch`) during training."""

from __future__ import annotations

import logging
import os
import socket
import threading
from dataclasses import dataclass
from urllib.parse import urlparse

from dcad.platform.errors import PlatformError, describe

CONNECT_TIMEOUT_S = 5.0
WATCH_INTERVAL_S = 5.0  # how often a running training checks that its workers still fit the cluster
# Non-secret settings the workers need to find the driver's caches and stores (never credentials)
FORWARDED_ENV = ("HF_HOME", "HF_HUB_CACHE", "HF_HUB_OFFLINE", "TORCH_HOME", "DCAD_HOME", "MLFLOW_TRACKING_URI",
                 "MLFLOW_S3_ENDPOINT_URL", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REQUEST_CHECKSUM_CALCULATION",
                 "AWS_RESPONSE_CHECKSUM_VALIDATION")
RAY_TRAIN_ENV = {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}  # a worker's print() reaches the driver's log once, not twice


class ClusterError(PlatformError):
    """The Ray cluster cannot be reached or cannot hold the requested workers."""


@dataclass(frozen=True)
class WorkerShape:
    """The CPUs and GPUs of one training worker (or, as NodeCapacity, of one node)."""

    cpus: float
    gpus: float = 0.0

    def describe(self, workers: int) -> str:
        gpus, need_gpus = (f", {self.gpus:g} GPU", f" and {workers * self.gpus:g} GPU") if self.gpus else ("", "")
        return f"{workers} worker(s) × ({self.cpus:g} CPU{gpus}) = {workers * self.cpus:g} CPU{need_gpus}"


NodeCapacity = WorkerShape


def quiet_worker_logs() -> None:
    """`worker_process_setup_hook`: silence the warning, every few seconds, that Ray lacks the dashboard extras."""
    logging.getLogger("ray.train.v2._internal.execution.controller.placement_group_cleaner").setLevel(logging.ERROR)


def connect(address: str | None) -> str:
    """Join the cluster at `address` ("auto": the running one; None: start a local Ray). Returns a description."""
    import ray

    where = f"Ray cluster at {address}" if address and address != "local" else "a local Ray instance"
    if ray.is_initialized():
        return where
    check_reachable(address)
    env = {**{name: os.environ[name] for name in FORWARDED_ENV if os.environ.get(name)}, **RAY_TRAIN_ENV}
    try:
        ray.init(address=address or None, log_to_driver=True, logging_level=logging.WARNING,
                 runtime_env={"env_vars": env, "worker_process_setup_hook": f"{__name__}.quiet_worker_logs"})
    except (ConnectionError, RuntimeError, ValueError, TimeoutError) as err:
        raise ClusterError(f"--address {address}: cannot connect to a Ray cluster ({describe(err)})") from None
    return where


def check_reachable(address: str | None, timeout: float = CONNECT_TIMEOUT_S) -> None:
    """A TCP connection to the GCS address (`host:port` or `ray://host:port`; none for a local Ray), or a ClusterError."""
    if address in (None, "", "auto", "local"):
        return
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

    alive = [node.get("Resources", {}) for node in ray.nodes() if node.get("Alive")]
    return [NodeCapacity(float(res.get("CPU", 0.0)), float(res.get("GPU", 0.0))) for res in alive]


def fits(workers: int, shape: WorkerShape, nodes: list[NodeCapacity]) -> bool:
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
    per_node = ", ".join(f"{n.cpus:g} CPU/{n.gpus:g} GPU" for n in nodes)
    return f"{sum(n.cpus for n in nodes):g} CPU and {sum(n.gpus for n in nodes):g} GPU on {len(nodes)} node(s) ({per_node})"


class CapacityWatch:
    """Says once when the workers of a running training stop fitting the cluster (Ray Train waits without a word)
    and once when they fit again."""

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

