"""`dcad pipeline run --resume`: finished steps are skipped (their outputs still feed later steps); a changed
step runs again with everything after it; a run without --resume starts over."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from fixtures_mlflow import run_dcad

SPEC = """
name: resumable
work_dir: {work}
steps:
  - {{name: data, kind: synth, size: 32, seed: {seed}, categories: [brick], train: 3, test: 2}}
  - {{name: check, kind: check, data: "${{work_dir}}/copy"}}
  - {{name: recheck, kind: check}}
"""


def write_spec(tmp_path: Path, seed: int = 0) -> Path:
    path = tmp_path / "resumable.yaml"
    path.write_text(SPEC.format(work=tmp_path / "work", seed=seed))
    return path


def state(tmp_path: Path) -> dict:
    return json.loads((tmp_path / "work" / "pipeline-state.json").read_text())["steps"]


def marker_mtime(tmp_path: Path) -> int:
    return (tmp_path / "work" / "data" / "dcad_synth.json").stat().st_mtime_ns


def test_resume_skips_finished_steps_and_feeds_their_outputs(tmp_path, capsys):
    spec = write_spec(tmp_path)
    first = run_dcad(capsys, "pipeline", "run", str(spec))
    assert first.code == 2 and "copy: no such directory" in " ".join(first.err.split())
    recorded = state(tmp_path)
    assert recorded["data"]["status"] == "done" and recorded["check"]["status"] == "failed"
    assert "recheck" not in recorded
    synthesised = marker_mtime(tmp_path)

    shutil.copytree(tmp_path / "work" / "data", tmp_path / "work" / "copy")
    second = run_dcad(capsys, "pipeline", "run", str(spec), "--resume", "--json")
    assert second.code == 0, second.err
    steps = {s["name"]: s for s in json.loads(second.out)["steps"]}
    assert [steps[n]["action"] for n in ("data", "check", "recheck")] == ["skip", "run", "run"]
    assert marker_mtime(tmp_path) == synthesised, "the skipped synth step must not write again"
    copy = str((tmp_path / "work" / "copy").resolve())
    assert steps["check"]["outputs"]["data"] == copy
    assert steps["recheck"]["inputs"]["data"] == copy, "implicit input from the latest step producing data"
    assert steps["check"]["outputs"]["digest"] == steps["data"]["outputs"]["digest"], "same images, same digest"
    assert all(r["status"] == "done" for r in state(tmp_path).values())

    third = run_dcad(capsys, "pipeline", "run", str(spec), "--resume", "--json")
    assert [s["action"] for s in json.loads(third.out)["steps"]] == ["skip", "skip", "skip"]


def test_changed_step_reruns_with_the_steps_after_it(tmp_path, capsys):
    spec = write_spec(tmp_path)
    (tmp_path / "work").mkdir()
    first = run_dcad(capsys, "pipeline", "run", str(spec))
    assert first.code == 2
    shutil.copytree(tmp_path / "work" / "data", tmp_path / "work" / "copy")
    assert run_dcad(capsys, "pipeline", "run", str(spec), "--resume").code == 0
    before = state(tmp_path)["data"]["outputs"]["digest"]

    changed = write_spec(tmp_path, seed=1)  # the data step's spec changes: it and every later step run again
    result = run_dcad(capsys, "pipeline", "run", str(changed), "--resume", "--json")
    assert result.code == 0, result.err
    assert [s["action"] for s in json.loads(result.out)["steps"]] == ["run", "run", "run"]
    assert state(tmp_path)["data"]["outputs"]["digest"] != before


def test_run_without_resume_starts_over(tmp_path, capsys):
    spec = write_spec(tmp_path)
    run_dcad(capsys, "pipeline", "run", str(spec))
    shutil.copytree(tmp_path / "work" / "data", tmp_path / "work" / "copy")
    synthesised = marker_mtime(tmp_path)
    result = run_dcad(capsys, "pipeline", "run", str(spec), "--json")
    assert result.code == 0, result.err
    assert [s["action"] for s in json.loads(result.out)["steps"]] == ["run", "run", "run"]
    assert marker_mtime(tmp_path) != synthesised


def test_state_of_another_pipeline_is_refused(tmp_path, capsys):
    spec = write_spec(tmp_path)
    run_dcad(capsys, "pipeline", "run", str(spec))
    other = tmp_path / "other.yaml"
    other.write_text(spec.read_text().replace("name: resumable", "name: other"))
    result = run_dcad(capsys, "pipeline", "run", str(other), "--resume")
    assert result.code == 2 and "state of pipeline 'resumable', not 'other'" in " ".join(result.err.split())
