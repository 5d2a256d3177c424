"""infra/: every manifest parses and carries what its kind requires; no credential is written down anywhere;
the Dockerfiles install the package the way pyproject.toml defines it."""

from __future__ import annotations

import re
import shlex
import tomllib
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

from dcad.platform.secrets import is_secret_name

ROOT = Path(__file__).resolve().parents[1]
INFRA = ROOT / "infra"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
EXTRA_SECRET_NAMES = ("PGPASSWORD", "POSTGRES_PASSWORD", "MINIO_ROOT_PASSWORD", "MINIO_ROOT_USER", "AWS_ACCESS_KEY_ID")


def load_docs(relative: str) -> list[dict]:
    docs = [d for d in yaml.safe_load_all((INFRA / relative).read_text()) if d is not None]
    assert docs, f"{relative} is empty"
    return docs


def secret_env(name: str) -> bool:
    return is_secret_name(name) or name in EXTRA_SECRET_NAMES


# ---- everything parses ---------------------------------------------------------------------------
@pytest.mark.parametrize("path", sorted(p.relative_to(INFRA).as_posix() for p in INFRA.rglob("*.yaml")))
def test_every_yaml_file_parses_to_mappings(path):
    for doc in load_docs(path):
        assert isinstance(doc, dict), f"{path}: a document is not a mapping"


# ---- KubeRay -----------------------------------------------------------------------------------
def containers(pod_template: dict) -> list[dict]:
    found = pod_template["spec"]["containers"]
    assert found and all(c.get("name") and c.get("image") for c in found), "every container needs a name and an image"
    return found


def check_ray_cluster_spec(spec: dict) -> None:
    head = spec["headGroupSpec"]
    assert isinstance(head["rayStartParams"], dict)
    head_ports = {p["containerPort"] for c in containers(head["template"]) for p in c.get("ports", [])}
    assert 6379 in head_ports, "the head must expose the GCS port"
    groups = spec["workerGroupSpecs"]
    assert groups, "at least one worker group"
    for group in groups:
        assert group["groupName"] and isinstance(group["rayStartParams"], dict)
        assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        containers(group["template"])
    gpus = [c["resources"]["limits"].get("nvidia.com/gpu") for g in groups for c in containers(g["template"])]
    assert any(gpus), "a GPU worker group (nvidia.com/gpu limit)"
    if spec.get("enableInTreeAutoscaling"):
        assert any(g["maxReplicas"] > g["minReplicas"] for g in groups), "autoscaling needs room between min and max"


def test_raycluster_has_head_and_gpu_worker_groups():
    (doc,) = load_docs("kuberay/raycluster.yaml")
    assert (doc["apiVersion"], doc["kind"]) == ("ray.io/v1", "RayCluster")
    assert doc["metadata"]["name"]
    check_ray_cluster_spec(doc["spec"])


def test_rayjob_runs_the_gpu_sweep_on_its_own_cluster():
    (doc,) = load_docs("kuberay/rayjob-sweep.yaml")
    assert (doc["apiVersion"], doc["kind"]) == ("ray.io/v1", "RayJob")
    argv = shlex.split(doc["spec"]["entrypoint"])
    assert argv == ["dcad", "sweep", "sweeps/paper-gpu.yaml", "--address", "auto"]
    from dcad.platform.sweep import load_sweep_spec

    assert load_sweep_spec(ROOT / argv[2]).resources.gpus_per_worker > 0, "the job's sweep asks for GPUs"
    check_ray_cluster_spec(doc["spec"]["rayClusterSpec"])
    assert doc["spec"]["shutdownAfterJobFinishes"] is True


# ---- MLflow on Kubernetes ------------------------------------------------------------------------
def test_mlflow_deployment_and_service_match():
    docs = {d["kind"]: d for d in load_docs("mlflow/mlflow.yaml")}
    deployment, service = docs["Deployment"], docs["Service"]
    assert deployment["apiVersion"] == "apps/v1" and service["apiVersion"] == "v1"
    selector = deployment["spec"]["selector"]["matchLabels"]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert selector and selector.items() <= labels.items(), "the selector must match the pod template's labels"
    assert service["spec"]["selector"].items() <= labels.items(), "the Service must select the Deployment's pods"
    (container,) = containers(deployment["spec"]["template"])
    port_names = {p["name"] for p in container["ports"]}
    assert all(p["targetPort"] in port_names for p in service["spec"]["ports"])


def mlflow_container() -> dict:
    deployment = next(d for d in load_docs("mlflow/mlflow.yaml") if d["kind"] == "Deployment")
    return containers(deployment["spec"]["template"])[0]


def test_mlflow_server_uses_postgres_and_proxies_artifacts_to_s3():
    container = mlflow_container()
    args = container["args"]
    assert "--serve-artifacts" in args
    assert any(a.startswith("--artifacts-destination=s3://") for a in args)
    allowed = next(a for a in args if a.startswith("--allowed-hosts=")).split("=", 1)[1].split(",")
    assert "mlflow:5000" in allowed, "clients reach the server through its Service name"
    env = {e["name"]: e for e in container["env"]}
    backend = env["MLFLOW_BACKEND_STORE_URI"]["value"]
    assert backend.startswith("postgresql+psycopg2://") and "@" not in backend, "the backend URI must carry no credentials"
    assert env["PGPASSWORD"]["valueFrom"]["secretKeyRef"]["name"]


# ---- credentials only by reference ----------------------------------------------------------------
def k8s_env_entries() -> list[tuple[str, dict]]:
    pods = []
    for path in ("kuberay/raycluster.yaml", "kuberay/rayjob-sweep.yaml", "mlflow/mlflow.yaml"):
        for doc in load_docs(path):
            pods += [(path, c) for c in _walk_containers(doc)]
    return [(path, e) for path, c in pods for e in c.get("env", [])]


def _walk_containers(node) -> list[dict]:
    if isinstance(node, dict):
        found = list(node["containers"]) if isinstance(node.get("containers"), list) else []
        return found + [c for v in node.values() for c in _walk_containers(v)]
    if isinstance(node, list):
        return [c for v in node for c in _walk_containers(v)]
    return []


def test_kubernetes_credentials_come_from_secrets():
    entries = k8s_env_entries()
    secret_entries = [(path, e) for path, e in entries if secret_env(e["name"])]
    assert len(secret_entries) >= 4
    for path, entry in secret_entries:
        assert "value" not in entry, f"{path}: {entry['name']} has a literal value"
        assert entry["valueFrom"]["secretKeyRef"]["name"], f"{path}: {entry['name']} must use a secretKeyRef"


def test_compose_credentials_are_env_file_placeholders():
    (doc,) = load_docs("compose/docker-compose.yaml")
    checked = 0
    for name, service in doc["services"].items():
        for key, value in (service.get("environment") or {}).items():
            if secret_env(key):
                assert re.fullmatch(r"\$\{[A-Z_]+(:\?[^}]*)?\}", str(value)), f"compose {name}.{key} = a literal"
                checked += 1
    assert checked >= 4


SECRET_PATTERNS = {
    "AWS access key id": re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b"),
    "private key": re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
    "password in a URL": re.compile(r"[a-z][a-z0-9+.-]*://[^/\s:@]+:[^/\s@$]+@", re.IGNORECASE),
    "assigned secret": re.compile(
        r"(?i)\b[A-Z0-9_]*(PASSWORD|SECRET|TOKEN|SECRET_ACCESS_KEY)[A-Z0-9_]*[ \t]*[:=][ \t]*['\"]?(?!\$\{|\$\(|\$\$)[A-Za-z0-9/+=_.-]{8,}"
    ),
}


def secret_findings(text: str) -> list[str]:
    return [name for name, pattern in SECRET_PATTERNS.items() if pattern.search(text)]


def test_secret_scanner_catches_planted_credentials():
    assert secret_findings("AWS_ACCESS_KEY_ID=AKIAABCDEFGHIJKLMNOP") == ["AWS access key id"]
    assert "password in a URL" in secret_findings("uri: postgresql://mlflow:hunter2hunter@db:5432/mlflow")
    assert "assigned secret" in secret_findings("MINIO_ROOT_PASSWORD: s3cretPassw0rd")
    assert secret_findings("PGPASSWORD: ${POSTGRES_PASSWORD:?set it}") == []
    assert secret_findings("MINIO_ROOT_PASSWORD=\nPOSTGRES_USER=mlflow\n") == [], "an empty value is a placeholder"
    assert secret_findings("valueFrom: {secretKeyRef: {name: dcad-s3, key: secret-access-key}}") == []


@pytest.mark.parametrize("path", sorted(p.relative_to(INFRA).as_posix() for p in INFRA.rglob("*") if p.is_file()))
def test_no_secret_looking_literal_in_infra(path):
    assert secret_findings((INFRA / path).read_text(errors="replace")) == [], f"infra/{path}"


# ---- compose and the Ray cluster launcher ----------------------------------------------------------
def test_compose_services_and_dependencies():
    (doc,) = load_docs("compose/docker-compose.yaml")
    services = doc["services"]
    assert {"minio", "postgres", "mlflow", "ray-head"} <= set(services)
    for name, service in services.items():
        assert service.get("image") or service.get("build"), f"compose service {name} has neither image nor build"
        for dependency in service.get("depends_on") or {}:
            assert dependency in services, f"compose {name} depends on unknown service {dependency}"
    command = services["mlflow"]["command"]
    assert "--serve-artifacts" in command and any(c.startswith("--artifacts-destination=s3://") for c in command)
    assert any(c.startswith("--allowed-hosts=") and "mlflow:5000" in c for c in command)
    env = services["mlflow"]["environment"]
    assert env["MLFLOW_BACKEND_STORE_URI"].startswith("postgresql+psycopg2://") and env["MLFLOW_S3_ENDPOINT_URL"] == "http://minio:9000"
    assert services["mlflow"]["build"]["dockerfile"] == "infra/docker/Dockerfile"
    assert (INFRA / "compose" / ".env.example").is_file()


def test_ray_launcher_config_has_required_fields():
    (doc,) = load_docs("ray/cluster.yaml")
    assert doc["cluster_name"] and doc["provider"]["type"]
    types = doc["available_node_types"]
    assert doc["head_node_type"] in types
    for name, node in types.items():
        assert isinstance(node["node_config"], dict) and isinstance(node["resources"], dict), name
        assert 0 <= node.get("min_workers", 0) <= node["max_workers"], name
    workers = [n for name, n in types.items() if name != doc["head_node_type"]]
    assert any(n["max_workers"] > n.get("min_workers", 0) for n in workers), "an autoscaling worker type"
    assert any(n["node_config"].get("InstanceType", "")[:1] in ("g", "p") for n in workers), "a GPU instance type (AWS g*/p*)"
    assert doc["max_workers"] >= sum(n.get("min_workers", 0) for n in workers)
    assert any("ray start --head" in c for c in doc["head_start_ray_commands"])
    assert any("--address=$RAY_HEAD_IP:6379" in c for c in doc["worker_start_ray_commands"])


# ---- Dockerfiles against pyproject.toml -------------------------------------------------------------
def dockerfile_runs(name: str) -> list[str]:
    text = (INFRA / "docker" / name).read_text().replace("\\\n", " ")
    return [line.strip()[4:] for line in text.splitlines() if line.strip().startswith("RUN ")]


@pytest.mark.parametrize("name", ["Dockerfile", "Dockerfile.cuda"])
def test_dockerfile_python_matches_requires_python(name):
    text = (INFRA / "docker" / name).read_text()
    version = re.search(r"^ARG PYTHON_VERSION=(\S+)", text, re.MULTILINE).group(1)
    assert re.search(r"^FROM python:\$\{PYTHON_VERSION\}", text, re.MULTILINE)
    assert version in SpecifierSet(PYPROJECT["project"]["requires-python"])


@pytest.mark.parametrize("name", ["Dockerfile", "Dockerfile.cuda"])
def test_dockerfile_installs_the_package_with_its_extras(name):
    installs = [shlex.split(run) for run in dockerfile_runs(name) if run.startswith("pip install")]
    targets = [arg for argv in installs for arg in argv[2:] if arg.startswith(".")]
    assert targets, f"{name} never runs pip install on the package"
    extras_defined = set(PYPROJECT["project"]["optional-dependencies"])
    for target in targets:
        match = re.fullmatch(r"\.(\[([a-z0-9_,-]+)\])?", target)
        assert match, target
        assert set(filter(None, (match.group(2) or "").split(","))) <= extras_defined, f"{name}: {target}"
    text = (INFRA / "docker" / name).read_text()
    assert "COPY pyproject.toml" in text and "COPY dcad ./dcad" in text


@pytest.mark.parametrize("name", ["Dockerfile", "Dockerfile.cuda"])
def test_dockerfile_torch_pins_match_pyproject(name):
    pinned = {Requirement(r).name: Requirement(r).specifier for r in PYPROJECT["project"]["dependencies"]}
    installed = {}
    for run in dockerfile_runs(name):
        if run.startswith("pip install") and "--index-url" in run:
            installed.update({Requirement(a).name: Requirement(a).specifier for a in shlex.split(run)[2:] if not a.startswith("-") and "://" not in a and not a.startswith("$")})
    assert {"torch", "torchvision"} <= set(installed)
    for package in ("torch", "torchvision"):
        assert installed[package] == pinned[package], f"{name}: {package}{installed[package]} vs pyproject {pinned[package]}"


def test_dockerfile_entry_script_is_defined_by_pyproject():
    assert "dcad" in PYPROJECT["project"]["scripts"]
    for name in ("Dockerfile", "Dockerfile.cuda"):
        assert 'CMD ["dcad"' in (INFRA / "docker" / name).read_text()
