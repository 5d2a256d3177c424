"""End to end on real servers: `dcad stack up` (PostgreSQL backend, artifacts proxied to moto's S3, a Ray head)
→ a tiny pipeline (synth → sweep on the stack's Ray head, or one training when `dcad sweep` is not installed →
register → gated promotion) → `dcad stack down` leaves none of its processes."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import psutil
import pytest

from fixtures_mlflow import run_dcad
from fixtures_procs import descendants
from fixtures_servers import HOST, free_port

pytestmark = pytest.mark.slow

MODEL = "e2e-stack"
TINY = {
    "train.base.epochs": 1,
    "train.base.iters_per_epoch": 10,
    "train.refiner.epochs": 1,
    "train.refiner.iters_per_epoch": 4,
    "train.validate_refiner": False,
}
HEAD = """
name: stack-e2e
work_dir: {work}
experiment: stack-e2e
device: cpu
steps:
  - {{name: data, kind: synth, seed: 0, size: 64, categories: [brick, hex_nut], train: 12, test: 8}}
"""
TRAIN = """
  - {{name: candidate, kind: train, profile: tiny, overrides: {overrides}}}
"""
SWEEP = """
  - {{name: candidate, kind: sweep, spec: "{spec}", address: "{address}"}}
"""
TAIL = """
  - {{name: register, kind: register, model_name: {model}}}
  - {{name: promote, kind: promote, model_name: {model}, alias: champion, floor: 0.0}}  # a smoke model: the floor has its own tests
"""


def sweep_ready() -> bool:
    """`dcad sweep` (issue 7) is used when its Python API is importable; otherwise the candidate is one training."""
    try:
        from dcad.platform.sweep import load_sweep_spec, run_sweep  # noqa: F401
    except ImportError:
        return False
    return True


def write_sweep_spec(tmp_path: Path) -> Path:
    import yaml

    spec = {
        "name": "stack-e2e",
        "base": {"profile": "tiny", "overrides": TINY},
        "dataset": str(tmp_path / "work" / "data"),
        "search_space": {"fusion.base_weight": {"type": "float", "low": 0.3, "high": 0.7}},
        "objective": [{"metric": "val_image_auroc", "mode": "max"}],
        "num_trials": 1,
        "max_concurrent": 1,
        "resources": {"workers": 1, "cpus_per_worker": 1},
        "storage": str(tmp_path / "sweeps"),
        "experiment": "stack-e2e",
    }
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def write_pipeline(tmp_path: Path, env: dict[str, str]) -> tuple[Path, str]:
    import json as _json

    head = HEAD.format(work=tmp_path / "work")
    if sweep_ready():
        kind, middle = "sweep", SWEEP.format(spec=write_sweep_spec(tmp_path), address=env["RAY_ADDRESS"])
    else:
        kind, middle = "train", TRAIN.format(overrides=_json.dumps(TINY))
    path = tmp_path / "pipeline.yaml"
    path.write_text(head + middle + TAIL.format(model=MODEL))
    return path, kind


def processes() -> dict[int, tuple[int, str]]:
    """Live processes: pid -> (session id, command line)."""
    found = {}
    for proc in psutil.process_iter(["cmdline", "status"]):
        try:
            if proc.info["cmdline"] and proc.info["status"] != psutil.STATUS_ZOMBIE:
                found[proc.pid] = (os.getsid(proc.pid), " ".join(proc.info["cmdline"]))
        except (OSError, psutil.Error):
            pass
    return found


def start_time(pid: int) -> float | None:
    try:
        return psutil.Process(pid).create_time()
    except psutil.Error:
        return None


def ours(snapshot: dict[int, tuple[int, str]], sessions: set[int], markers: list[str]) -> list[str]:
    return sorted(f"{pid} {cmd[:150]}" for pid, (sid, cmd) in snapshot.items() if sid in sessions or any(m in cmd for m in markers))


def started_by(leaders: set[int]) -> dict[int, float | None]:
    """Every descendant of the services' processes: pid -> start time."""
    return {pid: start_time(pid) for leader in leaders for pid in descendants(leader)}


@pytest.fixture()
def postgres_binaries():
    from dcad.platform.stack.postgres import find_binaries

    found = find_binaries()
    if found is None:
        pytest.skip("PostgreSQL binaries (initdb, postgres) are not installed: apt-get install -y postgresql")
    return found


def test_stack_up_pipeline_down(tmp_path, capsys, monkeypatch, postgres_binaries):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")  # a loopback-only test cluster
    monkeypatch.setenv("COLUMNS", "200")
    state_dir = tmp_path / "stack"
    ports = {name: free_port() for name in ("mlflow", "s3", "ray", "postgres")}
    markers = [str(state_dir), "dcad-stack-ray-"]
    before = processes()
    started = time.monotonic()
    up = run_dcad(capsys, "stack", "up", "--state-dir", str(state_dir), "--backend", "postgres", "--ray-cpus", "2",
                  *(item for name, port in ports.items() for item in (f"--{name}-port", str(port))))
    assert up.code == 0, up.err
    try:
        status = json.loads(run_dcad(capsys, "stack", "status", "--state-dir", str(state_dir), "--json").out)
        up_s = time.monotonic() - started
        sessions = {s["pid"] for s in status["services"]}
        running = ours(processes(), sessions, markers)
        family = started_by(sessions)  # includes PostgreSQL's backends, which leave the session
        check_status(status, ports, up.out)
        check_no_secret_written(state_dir, status, up)
        pipeline_s, kind = run_pipeline(tmp_path, status["env"], capsys)
        check_postgres_backend(ports["postgres"])
        check_artifacts_in_s3(status["env"]["MLFLOW_S3_ENDPOINT_URL"])
        sessions |= restart_keeps_everything(tmp_path, state_dir, ports, status["env"], capsys)
    finally:
        down = run_dcad(capsys, "stack", "down", "--state-dir", str(state_dir), "--purge")
    total_s = time.monotonic() - started
    assert down.code == 0, down.err
    after = processes()
    left = ours({p: v for p, v in after.items() if p not in before}, sessions, markers)
    with capsys.disabled():
        print(f"\n[stack e2e] up {up_s:.1f} s, pipeline ({kind}) {pipeline_s:.1f} s, total {total_s:.1f} s")
        print("[stack e2e] stack processes before up:", ours(before, sessions, markers))
        print(f"[stack e2e] while up ({len(running)}):", *running, sep="\n  ")
        print(f"[stack e2e] descendants of the services while up: {len(family)}")
        print("[stack e2e] stack processes after down:", left)
    assert left == [], f"processes of the stack still running after down: {left}"
    # live ones only: a killed child re-parented to a PID 1 that does not reap stays a zombie, which is not running
    outlived = [pid for pid, started in family.items() if pid in after and start_time(pid) == started]
    assert outlived == [], f"a child of a service outlived down: {[after[pid][1][:120] for pid in outlived]}"
    assert not (state_dir / "stack.json").exists()


def restart_keeps_everything(tmp_path: Path, state_dir: Path, ports: dict[str, int], env: dict[str, str], capsys) -> set[int]:
    """`stack down` then `stack up` on the same state directory: runs, registry and artifacts are all there, and
    the champion loads and scores images. Returns the new services' session ids."""
    from dcad.platform.mlflow_store import mlflow_client

    client = mlflow_client(env["MLFLOW_TRACKING_URI"])
    champion = client.get_model_version_by_alias(MODEL, "champion")
    runs_before = {r.info.run_id for r in client.search_runs([e.experiment_id for e in client.search_experiments()])}
    artifacts_before = sorted(a.path for a in client.list_artifacts(champion.run_id))
    down = run_dcad(capsys, "stack", "down", "--state-dir", str(state_dir))
    assert down.code == 0, down.err
    assert "object(s) of bucket dcad-artifacts kept in" in " ".join((down.out + down.err).split())
    up = run_dcad(capsys, "stack", "up", "--state-dir", str(state_dir), "--backend", "postgres", "--ray-cpus", "2",
                  *(item for name, port in ports.items() for item in (f"--{name}-port", str(port))))
    assert up.code == 0, up.err
    assert "object(s) restored from" in " ".join((up.out + up.err).split())
    status = json.loads(run_dcad(capsys, "stack", "status", "--state-dir", str(state_dir), "--json").out)
    client = mlflow_client(status["env"]["MLFLOW_TRACKING_URI"])
    assert {r.info.run_id for r in client.search_runs([e.experiment_id for e in client.search_experiments()])} == runs_before
    again = client.get_model_version_by_alias(MODEL, "champion")
    assert (again.version, again.run_id) == (champion.version, champion.run_id)
    assert sorted(a.path for a in client.list_artifacts(champion.run_id)) == artifacts_before
    images = tmp_path / "work" / "data" / "brick" / "test" / "good"
    predicted = run_dcad(capsys, "predict", f"models:/{MODEL}@champion", str(images), "--out", str(tmp_path / "pred"),
                         "--tracking-uri", status["env"]["MLFLOW_TRACKING_URI"])
    assert predicted.code == 0, predicted.err[-2000:]
    assert (tmp_path / "pred" / "predictions.csv").is_file()
    return {s["pid"] for s in status["services"]}


def check_status(status: dict, ports: dict[str, int], up_out: str) -> None:
    services = {s["service"]: s for s in status["services"]}
    assert set(services) == {"postgres", "s3", "mlflow", "ray"} and status["running"]
    assert all(s["alive"] and s["listening"] for s in services.values())
    assert {name: services[name]["port"] for name in ports} == ports
    env = status["env"]
    assert env == {"MLFLOW_TRACKING_URI": f"http://{HOST}:{ports['mlflow']}", "MLFLOW_S3_ENDPOINT_URL": f"http://{HOST}:{ports['s3']}",
                   "RAY_ADDRESS": f"{HOST}:{ports['ray']}"}
    for key, value in env.items():
        assert f"export {key}={value}" in up_out


def check_no_secret_written(state_dir: Path, status: dict, up) -> None:
    """The S3 keys the MLflow server got are in its environment only: not in the state file, logs or output."""
    server = next(s for s in status["services"] if s["service"] == "mlflow")
    secret = psutil.Process(server["pid"]).environ()["AWS_SECRET_ACCESS_KEY"]
    assert len(secret) >= 20
    written = [p.read_text(errors="replace") for p in state_dir.iterdir() if p.is_file()]
    assert all(secret not in text for text in [*written, up.out, up.err])


def run_pipeline(tmp_path: Path, env: dict[str, str], capsys) -> tuple[float, str]:
    spec, kind = write_pipeline(tmp_path, env)
    started = time.monotonic()
    result = run_dcad(capsys, "pipeline", "run", str(spec), "--tracking-uri", env["MLFLOW_TRACKING_URI"], "--json")
    seconds = time.monotonic() - started
    assert result.code == 0, result.err[-3000:]
    steps = {s["name"]: s for s in json.loads(result.out)["steps"]}
    with capsys.disabled():
        print("\n[stack e2e] step seconds:", {name: step["seconds"] for name, step in steps.items()})
    run_id = steps["candidate"]["outputs"]["run_id"]
    assert run_id and steps["register"]["outputs"]["run_id"] == run_id
    assert steps["promote"]["outputs"]["decision"] == "first" and steps["promote"]["outputs"]["moved"] is True

    from dcad.platform.mlflow_store import mlflow_client

    client = mlflow_client(env["MLFLOW_TRACKING_URI"])
    champion = client.get_model_version_by_alias(MODEL, "champion")
    assert champion.version == steps["register"]["outputs"]["version"] == steps["promote"]["outputs"]["version"]
    assert champion.run_id == run_id
    if kind == "sweep":
        parent = steps["candidate"]["outputs"]["parent_run_id"]
        assert client.get_run(run_id).data.tags.get("mlflow.parentRunId") == parent, "the best trial is a child of the sweep run"
    return seconds, kind


def check_postgres_backend(port: int) -> None:
    """The runs and the registry live in the stack's PostgreSQL database."""
    import psycopg2

    conn = psycopg2.connect(host=HOST, port=port, user="dcad", dbname="mlflow", connect_timeout=5)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT count(*) FROM runs")
            assert cur.fetchone()[0] >= 1
            cur.execute("SELECT name FROM registered_models")
            assert (MODEL,) in cur.fetchall()
    finally:
        conn.close()


def check_artifacts_in_s3(endpoint: str) -> None:
    """The server proxied the model's files into the S3 bucket (moto accepts any keys)."""
    from dcad.platform.storage import list_keys, s3_client

    client = s3_client(endpoint, aws_access_key_id="anything-goes", aws_secret_access_key="moto-ignores-it", region_name="us-east-1")
    keys = list_keys(client, "dcad-artifacts", "mlflow/")
    assert any(key.endswith("dcad_model.json") for key in keys), keys[:20]
