"""`dcad sweep`: Ray Tune + Optuna over a DRDC config's parameters (see docs/cluster.md, "Sweeps").

Ray and Optuna are imported only when a sweep runs, so loading and checking a spec is cheap.
"""

from __future__ import annotations

from dcad.platform.sweep.runner import plan_sweep, run_sweep
from dcad.platform.sweep.spec import SweepSpecError, load_sweep_spec
