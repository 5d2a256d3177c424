"""`dcad --help` stays fast: the app imports each verb's heavy dependencies only when that verb runs."""

from __future__ import annotations

import subprocess
import sys

HEAVY = ("torch", "mlflow", "ray", "timm", "optuna", "scipy", "diffusers")


def test_the_cli_app_imports_no_heavy_library():
    code = f"import sys, dcad.cli.app; print(','.join(m for m in {HEAVY!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout.strip()
    assert out == "", f"`import dcad.cli.app` pulled in {out}: import them inside the verb that needs them"


def test_help_lists_every_verb():
    out = subprocess.run([sys.executable, "-m", "dcad.cli.app", "--help"], check=True, capture_output=True, text=True,
                         env={"COLUMNS": "100", "PATH": ""}).stdout
    for verb in ("train", "eval", "predict", "sweep", "leaderboard", "promote", "models", "pipeline", "stack", "ui"):
        assert f" {verb} " in out, verb
