"""How long the `dcad` CLI takes to start: `dcad --help` and `dcad VERB --help` against a bare Python start.

Each command runs `--repeat` times in a fresh process (after one warm-up run that fills the page cache);
the figure is the median wall time, and the ratio is against `python -c pass` measured in the same run.
Verbs import what they need when they run, so `--help` must not pay for torch, MLflow or Ray.

    python bench/cli_startup.py            # writes bench/results/cli_startup.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results" / "cli_startup.json"
COMMANDS = {
    "python -c pass (baseline)": [sys.executable, "-c", "pass"],
    "dcad --help": [sys.executable, "-m", "dcad.cli.app", "--help"],
    "dcad train --help": [sys.executable, "-m", "dcad.cli.app", "train", "--help"],
    "dcad sweep --help": [sys.executable, "-m", "dcad.cli.app", "sweep", "--help"],
    "dcad leaderboard --help": [sys.executable, "-m", "dcad.cli.app", "leaderboard", "--help"],
}
HEAVY = ("torch", "mlflow", "ray", "timm", "optuna", "scipy")


def wall(cmd: list[str], repeat: int) -> list[float]:
    subprocess.run(cmd, check=True, capture_output=True)  # warm-up
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True)
        times.append(time.perf_counter() - start)
    return times


def heavy_imports() -> list[str]:
    """Heavy packages that importing the CLI app pulls in (should be none)."""
    code = f"import sys, dcad.cli.app; print(','.join(m for m in {HEAVY!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout.strip()
    return [m for m in out.split(",") if m]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    rows = {name: statistics.median(wall(cmd, args.repeat)) for name, cmd in COMMANDS.items()}
    base = rows["python -c pass (baseline)"]
    result = {
        "repeat": args.repeat,
        "median_seconds": rows,
        "ratio_to_bare_python": {k: v / base for k, v in rows.items()},
        "heavy_modules_imported_by_the_app": heavy_imports(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    for name, seconds in rows.items():
        print(f"{name:32s} {seconds:6.3f} s  ({seconds / base:5.1f}× bare python)")
    print(f"heavy modules imported by `import dcad.cli.app`: {result['heavy_modules_imported_by_the_app'] or 'none'}")


if __name__ == "__main__":
    main()
