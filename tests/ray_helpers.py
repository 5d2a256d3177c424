"""A real Ray cluster on loopback for the Ray Train tests, and helpers to run `dcad train` against it.

Every node is `ray start --block` in its own process group, with its own ports and a private
`--temp-dir`, so stopping it (SIGTERM, then SIGKILL, to that group) never touches another
engineer's Ray processes; `ray stop` (which kills every Ray process on the machine) is never used.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from fixtures_procs import descendants, read_cmdline
from fixtures_servers import HOST, free_port

NODE_START_TIMEOUT_S = 120
# Token authentication turns itself on once ~/.ray/auth_token exists; the test cluster is loopback-only.
RAY_TEST_ENV = {"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
OBJECT_STORE_BYTES = 256 * 1024**2


def _ray_executable() -> str:
    local = Path(sys.executable).with_name("ray")
    found = str(local) if local.exists() else shutil.which("ray")
    if not found:
        pytest.skip("the ray CLI is not installed")
    return found


def node_env() -> dict[str, str]:
    """The nodes' environment: no cloud credentials, no inherited Ray address."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "MLFLOW_", "RAY_"))}
    return {**env, **RAY_TEST_ENV}


@dataclass
class RayNode:
    proc: subprocess.Popen
    log: Path

    def pids(self) -> list[int]:
        """The `ray start` process and all its descendants (raylet, workers, agents)."""
        return [self.proc.pid, *descendants(self.proc.pid)]

    def stop(self, grace_s: float = 3.0) -> None:
        if self.proc.poll() is not None:
            return
        _signal_group(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            pass
        _signal_group(self.proc.pid, signal.SIGKILL)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass

    def tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _node_ports(head: bool) -> list[str]:
    ports = [
        "--node-manager-port", str(free_port()),
        "--object-manager-port", str(free_port()),
        "--dashboard-agent-listen-port", str(free_port()),
        "--dashboard-agent-grpc-port", str(free_port()),
        "--metrics-export-port", str(free_port()),
        "--runtime-env-agent-port", str(free_port()),
    ]
    if head:
        ports += ["--dashboard-port", str(free_port())]
    return ports


@dataclass
class LoopbackCluster:
    """A head node and extra nodes, all on 127.0.0.1."""

    temp_dir: Path
    port: int = field(default_factory=free_port)
    nodes: list[RayNode] = field(default_factory=list)

    @property
    def address(self) -> str:
        return f"{HOST}:{self.port}"

    def _start(self, args: list[str], name: str) -> RayNode:
        log = self.temp_dir / f"{name}.log"
        cmd = [
            _ray_executable(), "start", "--block", "--disable-usage-stats",
            "--node-ip-address", HOST, "--object-store-memory", str(OBJECT_STORE_BYTES), *args,
        ]
        with log.open("ab") as fh:
            proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=node_env(), start_new_session=True)
        node = RayNode(proc, log)
        self.nodes.append(node)
        return node

    def start_head(self, num_cpus: int) -> RayNode:
        args = ["--head", "--port", str(self.port), "--num-cpus", str(num_cpus), "--temp-dir", str(self.temp_dir / "ray"),
                "--include-dashboard", "false", *_node_ports(True)]
        node = self._start(args, "head")
        self.wait_for_nodes(1, node)
        return node

    def add_node(self, num_cpus: int) -> RayNode:
        name = f"node{len(self.nodes)}"
        args = ["--address", self.address, "--num-cpus", str(num_cpus), "--temp-dir", str(self.temp_dir / name),
                *_node_ports(False)]
        node = self._start(args, name)
        self.wait_for_nodes(sum(n.proc.poll() is None for n in self.nodes), node)  # killed nodes are not counted
        return node

    def wait_for_nodes(self, count: int, node: RayNode) -> None:
        deadline = time.monotonic() + NODE_START_TIMEOUT_S
        while time.monotonic() < deadline:
            if node.proc.poll() is not None:
                raise RuntimeError(f"ray start exited with {node.proc.returncode}:\n{node.tail()}")
            if self.alive_nodes() >= count:
                return
            time.sleep(1.0)
        raise RuntimeError(f"the Ray cluster did not reach {count} node(s) in {NODE_START_TIMEOUT_S} s:\n{node.tail()}")

    def alive_nodes(self) -> int:
        """Alive nodes per `ray status` on this cluster's address (-1 if it does not answer yet)."""
        out = subprocess.run(
            [_ray_executable(), "status", "--address", self.address],
            capture_output=True, text=True, env=node_env(), timeout=60,
        )
        if out.returncode != 0:
            return -1
        lines = out.stdout.split("Active:", 1)[-1].split("Pending:", 1)[0]
        return sum(1 for line in lines.splitlines() if "node_" in line)

    def train_worker_pids(self, node_index: int | None = None) -> list[int]:
        """Pids of the Ray Train worker processes of this cluster (optionally of one node)."""
        nodes = self.nodes if node_index is None else [self.nodes[node_index]]
        pids = [p for n in nodes for p in descendants(n.proc.pid)]
        return [p for p in pids if "RayTrainWorker" in " ".join(read_cmdline(p) or ())]

    def stop(self) -> None:
        for node in reversed(self.nodes):
            node.stop()
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def start_cluster(nodes_cpus: list[int]) -> LoopbackCluster:
    # a short path: Ray's unix sockets live under the temp dir and paths are limited to 107 bytes
    cluster = LoopbackCluster(Path(tempfile.mkdtemp(prefix="dcadray-", dir="/tmp")))
    try:
        cluster.start_head(nodes_cpus[0])
        for cpus in nodes_cpus[1:]:
            cluster.add_node(cpus)
    except BaseException:
        cluster.stop()
        raise
    return cluster


# ---- fixtures ----------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def ray_dataset(tmp_path_factory) -> Path:
    """The synthetic benchmark, 2 categories at 64 px: 12 train and 20 test images per category.

    20 test images keep one swapped pair of image scores well under the ±0.02 the equivalence test allows.
    """
    from dcad.core.data import CATEGORIES, synthesize

    root = tmp_path_factory.mktemp("ray-synth") / "data"
    synthesize(root, seed=0, size=64, categories=CATEGORIES[:2], n_train=12, n_test=20)
    return root


# ---- running `dcad train` in a subprocess ----------------------------------------------------------
@dataclass
class DcadProcess:
    proc: subprocess.Popen
    log: Path

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"dcad did not finish in {timeout} s:\n{self.text()[-4000:]}") from None

    def kill(self) -> None:
        _signal_group(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


def start_dcad(args: list[str], log: Path, env: dict[str, str] | None = None) -> DcadProcess:
    """`dcad ARGS` as its own process group, output (stdout and stderr) to `log`."""
    cmd = [sys.executable, "-m", "dcad.cli.app", *args]
    inherited = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}  # tests say these
    full_env = {**inherited, "COLUMNS": "200", "NO_COLOR": "1", "RAY_DEDUP_LOGS": "0", **RAY_TEST_ENV, **(env or {})}
    with log.open("ab") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=full_env, start_new_session=True)
    return DcadProcess(proc, log)


def run_dcad_process(args: list[str], log: Path, timeout: float, env: dict[str, str] | None = None) -> tuple[int, str]:
    process = start_dcad(args, log, env)
    code = process.wait(timeout)
    return code, process.text()


def wait_for(predicate, timeout: float, what: str, interval: float = 0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")
