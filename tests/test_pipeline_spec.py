"""`dcad pipeline run`: the shipped pipelines load, bad files are one-line errors, --dry-run only plans."""

from __future__ import annotations

from pathlib import Path

import pytest

from fixtures_mlflow import run_dcad

ROOT = Path(__file__).resolve().parents[1]


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


GOOD = """
name: demo
work_dir: {work}/${{name}}
steps:
  - {{name: data, kind: synth, size: 32, categories: [brick], train: 4, test: 2}}
  - {{name: train, kind: train, profile: tiny}}
  - {{name: register, kind: register, model_name: demo}}
  - {{name: promote, kind: promote, model_name: demo, alias: champion}}
"""


def test_shipped_pipelines_load_with_the_documented_flow():
    from dcad.platform.pipeline.load import load_pipeline

    quick = load_pipeline(ROOT / "pipelines" / "quickstart.yaml")
    assert [s.kind for s in quick.steps] == ["synth", "check", "train", "evaluate", "register", "promote"]
    production = load_pipeline(ROOT / "pipelines" / "production.yaml")
    kinds = [s.kind for s in production.steps]
    assert kinds.index("sweep") < kinds.index("register") < len(kinds) - 1 - kinds[::-1].index("promote")
    champion = [s for s in production.steps if s.kind == "promote" and s.alias == "champion"]
    assert champion and champion[0].run_id == "${steps.sweep.run_id}" and not champion[0].force


@pytest.mark.parametrize(
    "steps, expected",
    [
        ("  - {name: a, kind: bake}\n", "steps[0]: unknown step kind 'bake'"),
        ("  - {name: a, kind: synth, colour: red}\n", "unknown key 'steps[0].colour'"),
        ("  - {name: a, kind: register}\n", "missing key 'steps[0].model_name'"),
        ("  - {name: a, kind: synth}\n  - {name: a, kind: check}\n", "steps[1].name 'a' is used twice"),
        ("  - {name: a, kind: check, data: '${steps.b.data}'}\n  - {name: b, kind: synth}\n",
         "steps[0] (a): ${steps.b.data} names 'b', which is not an earlier step"),
        ("  - {name: a, kind: synth}\n  - {name: b, kind: check, data: '${steps.a.run_id}'}\n",
         "step 'a' has no output 'run_id' (it has data, digest)"),
        ("  - {name: a, kind: synth}\n  - {name: r, kind: register, model_name: m}\n",
         "steps[1] (r): no 'run_id' given and no earlier step produces 'run_id'"),
        ("  - {name: a, kind: synth}\n  - {name: e, kind: evaluate, model: m, require: {accuracy: 0.5}}\n",
         "unknown metric(s) accuracy"),
        ("  - {name: a, kind: synth, seed: -1}\n", "invalid value for 'steps[0].seed'"),
    ],
)
def test_bad_pipeline_is_one_line_error_naming_file_and_key(tmp_path, capsys, steps, expected):
    spec = write(tmp_path / "bad.yaml", f"name: bad\nwork_dir: {tmp_path}/work\nsteps:\n{steps}")
    result = run_dcad(capsys, "pipeline", "run", str(spec))
    assert result.code == 2
    message = " ".join(result.err.split())  # rich may wrap the line on narrow terminals
    assert str(spec) in message and expected in message
    assert "Traceback" not in result.err
    assert not (tmp_path / "work").exists(), "a bad spec must not start any step"


def test_unreadable_and_non_mapping_files_are_one_line_errors(tmp_path, capsys):
    missing = run_dcad(capsys, "pipeline", "run", str(tmp_path / "nope.yaml"))
    assert missing.code == 2 and "cannot read the pipeline file" in missing.err
    listing = run_dcad(capsys, "pipeline", "run", str(write(tmp_path / "list.yaml", "- a\n- b\n")))
    assert listing.code == 2 and "top level must be a mapping" in listing.err


def test_dry_run_prints_the_plan_and_runs_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("DCAD_HOME", str(tmp_path / "home"))
    spec = write(tmp_path / "demo.yaml", GOOD.format(work=tmp_path / "runs"))
    result = run_dcad(capsys, "pipeline", "run", str(spec), "--dry-run")
    assert result.code == 0, result.err
    for name in ("data", "train", "register", "promote"):
        assert name in result.out
    assert result.out.count("planned") == 4 and "dry run: nothing was executed" in result.out
    assert not (tmp_path / "runs").exists() and not (tmp_path / "home").exists(), "a dry run writes nothing"


def test_dry_run_json_shows_resolved_and_implicit_inputs(tmp_path, capsys, monkeypatch):
    import json

    monkeypatch.setenv("DCAD_HOME", str(tmp_path / "home"))
    spec = write(tmp_path / "demo.yaml", GOOD.format(work=tmp_path / "runs"))
    result = run_dcad(capsys, "pipeline", "run", str(spec), "--dry-run", "--json")
    assert result.code == 0, result.err
    payload = json.loads(result.out)
    work = tmp_path / "runs" / "demo"
    assert payload["work_dir"] == str(work) and payload["state_file"] == str(work / "pipeline-state.json")
    steps = {s["name"]: s for s in payload["steps"]}
    assert [s["name"] for s in payload["steps"]] == ["data", "train", "register", "promote"]
    assert all(s["action"] == "planned" for s in payload["steps"])
    assert steps["data"]["inputs"]["out"] == f"{work}/data", "${work_dir} resolves to the pipeline's work dir"
    assert steps["train"]["inputs"]["data"] == "${steps.data.data}", "implicit: the data step's output"
    assert steps["register"]["inputs"]["run_id"] == "${steps.train.run_id}"
    assert steps["promote"]["inputs"]["data"] == "${steps.train.data}", "the latest step that produced data"
    assert not work.exists() and not (tmp_path / "home").exists()
