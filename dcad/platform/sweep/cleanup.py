"""Remove the worker placement group a stopped multi-worker trial leaves behind (ray-project/ray#54305): Ray frees
it only when the sweep's job ends, and its CPUs would let no further worker group start. Rank 0 reports its id."""

from __future__ import annotations

from ray.tune import Callback

from dcad.platform.ray_worker import PLACEMENT_GROUP_KEY
from dcad.platform.sweep.progress import logger
from dcad.platform.sweep.reporting import DONE_KEY


class PlacementGroupJanitor(Callback):
    """Removes the worker placement group of a trial that ended without finishing (stopped or failed)."""

    def on_trial_complete(self, iteration: int, trials: list, trial, **info) -> None:
        import ray
        from ray.util.placement_group import PlacementGroup, remove_placement_group

        group = (trial.last_result or {}).get(PLACEMENT_GROUP_KEY)
        if not group or (trial.last_result or {}).get(DONE_KEY) == 1.0:
            return
        try:
            remove_placement_group(PlacementGroup(ray.PlacementGroupID.from_hex(group)))
            logger.info(f"released the placement group of stopped trial {trial.trial_id}")
        except Exception as err:  # noqa: BLE001 - already removed, or the cluster is going away: the sweep goes on
            logger.debug(f"placement group {group} not removed ({err})")

    on_trial_error = on_trial_complete
