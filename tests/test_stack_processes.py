"""`dcad stack`: a taken port is a one-line error before anything starts; `down` stops exactly the recorded
processes (pid + start time + command line), never a process that merely reuses a recorded pid."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time

import pytest

from fixtures_mlflow import run_dcad
from fixtures_servers import HOST, free_port


def sleeper(*marker: str) -> subprocess.Popen:
    """A harmless long-running process in its own session (the way the stack starts its services)."""
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)", *marker], start_new_session=True)


def record_for(proc: subprocess.Popen, name: str, port: int, **changes):
    from dcad.platform.stack import ServiceRecord
    from dcad.platform.stack.procs import identify

    for _ in range(50):
        who = identify(proc.pid)
        if who is not None and who.cmdline[-1:] == (name,):
            break
        time.sleep(0.05)
    fields = dict(name=name, pid=who.pid, start_time=who.start_time, cmdline=list(who.cmdline), host=HOST, port=port,
                  url=f"http://{HOST}:{port}", log="/dev/null")
    return ServiceRecord(**{**fields, **changes})


def alive(proc: subprocess.Popen) -> bool:
    return proc.poll() is None


def test_port_in_use_is_a_one_line_error_and_nothing_starts(tmp_path, capsys):
    with socket.socket() as taken:
        taken.bind((HOST, 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_dcad(capsys, "stack", "up", "--state-dir", str(tmp_path / "stack"), "--backend", "sqlite",
                          "--mlflow-port", str(port), "--s3-port", str(free_port()), "--ray-port", str(free_port()))
    assert result.code == 2
    assert f"port {port} on {HOST} (mlflow) is already in use; choose another with --mlflow-port" in " ".join(result.err.split())
    assert "Traceback" not in result.err
    assert not (tmp_path / "stack" / "stack.json").exists()


def test_same_port_for_two_services_is_refused(tmp_path, capsys):
    port = str(free_port())
    result = run_dcad(capsys, "stack", "up", "--state-dir", str(tmp_path / "stack"), "--backend", "sqlite", "--no-ray",
                      "--mlflow-port", port, "--s3-port", port)
    assert result.code == 2 and f"port {port} is given to both mlflow and s3" in " ".join(result.err.split())


def test_postgres_required_but_missing_is_a_clear_error(tmp_path, capsys):
    result = run_dcad(capsys, "stack", "up", "--state-dir", str(tmp_path / "stack"), "--backend", "postgres",
                      "--postgres-bin", str(tmp_path))
    assert result.code == 2 and f"--postgres-bin {tmp_path}: no initdb and postgres programs there" in " ".join(result.err.split())


def test_down_stops_only_processes_that_still_match_their_record(tmp_path, capsys):
    from dcad.platform.stack import StackState

    ours, reused = sleeper("s3"), sleeper("mlflow")
    try:
        state = StackState(tmp_path / "stack" / "stack.json")
        state.add(record_for(ours, "s3", 1))
        # the same pid and start time, but another command line: as if the pid had been reused
        state.add(record_for(reused, "mlflow", 2, cmdline=["mlflow", "server"]))
        result = run_dcad(capsys, "stack", "down", "--state-dir", str(tmp_path / "stack"))
        assert result.code == 0, result.err
        ours.wait(timeout=10)
        assert not alive(ours)
        assert alive(reused), "a process whose command line differs from the record must not be touched"
        assert "pid now belongs to another process" in result.err
        assert not (tmp_path / "stack" / "stack.json").exists()
    finally:
        for proc in (ours, reused):
            if alive(proc):
                proc.kill()
                proc.wait()


def test_down_kills_the_session_and_the_children_that_left_it(tmp_path):
    """A service's children (raylet, gcs_server) share its session; PostgreSQL's call setsid(). down leaves neither."""
    from dcad.platform.stack import StackState, down
    from fixtures_procs import descendants

    code = (
        "import subprocess, sys, time; sleep = [sys.executable, '-c', 'import time; time.sleep(300)'];"
        "subprocess.Popen(sleep); subprocess.Popen(sleep, start_new_session=True); time.sleep(300)"
    )
    leader = subprocess.Popen([sys.executable, "-c", code, "ray"], start_new_session=True)
    try:
        deadline = time.monotonic() + 20
        while len(descendants(leader.pid)) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        children = descendants(leader.pid)
        assert len(children) == 2
        state = StackState(tmp_path / "stack.json")
        state.add(record_for(leader, "ray", 3))
        assert down(tmp_path, log=lambda _m: None) == [("ray", leader.pid, "stopped")]
        leader.wait(timeout=10)
        deadline = time.monotonic() + 5
        while any(_running(pid) for pid in children) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not any(_running(pid) for pid in children)
    finally:
        if alive(leader):
            leader.kill()
            leader.wait()


def _running(pid: int) -> bool:
    from dcad.platform.stack.procs import identify

    who = identify(pid)
    return who is not None and "time.sleep(300)" in " ".join(who.cmdline)


def test_status_without_a_stack_and_with_a_dead_one(tmp_path, capsys):
    from dcad.platform.stack import StackState

    none = run_dcad(capsys, "stack", "status", "--state-dir", str(tmp_path / "stack"))
    assert none.code == 1 and "no stack recorded" in none.out

    proc = sleeper("s3")
    state = StackState(tmp_path / "stack" / "stack.json", env={"MLFLOW_TRACKING_URI": "http://127.0.0.1:1"})
    state.add(record_for(proc, "s3", free_port()))
    live = run_dcad(capsys, "stack", "status", "--state-dir", str(tmp_path / "stack"), "--json")
    proc.kill()
    proc.wait()
    dead = run_dcad(capsys, "stack", "status", "--state-dir", str(tmp_path / "stack"), "--json")
    first, second = json.loads(live.out), json.loads(dead.out)
    assert first["services"][0]["alive"] is True and first["services"][0]["listening"] is False
    assert second["services"][0]["alive"] is False and second["running"] is False
    assert second["env"] == {"MLFLOW_TRACKING_URI": "http://127.0.0.1:1"}


@pytest.mark.parametrize("backend, expected", [("sqlite", "sqlite")])
def test_backend_choice(tmp_path, backend, expected):
    from dcad.platform.stack import StackOptions, choose_backend

    assert choose_backend(StackOptions(tmp_path, backend=backend))[0] == expected
    assert choose_backend(StackOptions(tmp_path, postgres_uri="postgresql://db/mlflow"))[0] == "external"


def test_a_state_file_of_an_earlier_version_still_identifies_its_processes():
    """Earlier versions recorded start times in clock ticks since boot; `down` must still recognise those processes."""
    import os

    from dcad.platform.stack.procs import matches

    proc = sleeper("ticks")
    try:
        record = record_for(proc, "ticks", 1)
        with open(f"/proc/{proc.pid}/stat") as f:
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        old = record_for(proc, "ticks", 1, start_time=ticks)
        assert old.start_time < 1e9 and matches(old.process) and matches(record.process)
        assert not matches(record_for(proc, "ticks", 1, start_time=ticks + os.sysconf("SC_CLK_TCK")).process)
    finally:
        proc.kill()
