"""`dcad data synth|check` through typer's runner and as a real process (exit codes, one-line errors)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from dcad.cli.app import app
from dcad.core.errors import DatasetError

runner = CliRunner()
ARGS = ["--size", "48", "--categories", "gravel,capsule", "--train", "2", "--test", "6"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("cli") / "ds"
    result = runner.invoke(app, ["data", "synth", str(out), "--seed", "2", *ARGS])
    assert result.exit_code == 0, result.output
    assert "capsule" in result.output and "gravel" in result.output
    return out


def test_synth_then_check_json(dataset: Path) -> None:
    result = runner.invoke(app, ["data", "check", str(dataset), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["layout"] == "mvtec" and sorted(summary["categories"]) == ["capsule", "gravel"]
    for entry in summary["categories"].values():
        assert entry["train"] == 2 and entry["test"]["good"] == 2 and sum(entry["test"].values()) == 6
        assert 0.0 < entry["mask_coverage"] < 0.5 and entry["sizes"] == ["48x48"]


def test_check_table_lists_categories_and_defects(dataset: Path) -> None:
    result = runner.invoke(app, ["data", "check", str(dataset)])
    assert result.exit_code == 0, result.output
    for word in ("capsule", "gravel", "scratch", "coverage", "total (2)"):
        assert word in result.stdout


def test_synth_json_summary_matches_the_files(tmp_path: Path) -> None:
    result = runner.invoke(app, ["data", "synth", str(tmp_path / "j"), "--json", *ARGS])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    written = sorted((tmp_path / "j" / "capsule" / "test").rglob("*.png"))
    assert len(written) == sum(summary["categories"]["capsule"]["test"].values()) == 6


def test_synth_refuses_non_empty_dir_via_dcad_error(dataset: Path) -> None:
    result = runner.invoke(app, ["data", "synth", str(dataset), *ARGS])
    assert isinstance(result.exception, DatasetError) and "not empty" in str(result.exception)


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dcad.cli.app", *args], capture_output=True, text=True, timeout=120)


def test_bad_dataset_exits_2_with_one_line_naming_the_file(dataset: Path, tmp_path: Path) -> None:
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(dataset, broken)
    mask = next((broken / "gravel" / "ground_truth").rglob("*_mask.png"))
    mask.unlink()
    proc = _run("data", "check", str(broken))
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in proc.stderr
    assert mask.name.replace("_mask", "") in lines[0] and "anomalous image without mask" in lines[0]


def test_missing_dir_exits_2(tmp_path: Path) -> None:
    proc = _run("data", "check", str(tmp_path / "nowhere"))
    assert proc.returncode == 2 and "no such dataset directory" in proc.stderr
    assert len([line for line in proc.stderr.splitlines() if line.strip()]) == 1
