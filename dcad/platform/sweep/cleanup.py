"""Removing the placement group a multi-worker trial's Ray Train run leaves behind when Tune stops the trial.

When ASHA (or Ctrl-C) stops a trial, Tune kills the trial's actor and with it the Ray Train controller;
the controller's worker placement group is not detached, but GCS only removes such a group once both
its creator actor *and* its creator job are dead, i.e. at the end of the sweep. Ray Train's own cleaner
watches the controller through the state API, which needs the dashboard; without it the leaked CPUs let
no further worker group start (ray-project/ray#54305). Rank 0 of every Ray Train run puts its placement
group's id in each report (`ray_worker.PLACEMENT_GROUP_KEY`); `PlacementGroupJanitor`, a Tune callback on
the driver, removes that group when a trial ends without finishing. A one-worker trial trains inside its
Tune function and has no such group.
"""

from __future__ import annotations

import logging

from ray.tune import Callback

from dcad.platform.ray_worker import PLACEMENT_GROUP_KEY
from dcad.platform.sweep.reporting import DONE_KEY

logger = logging.getLogger("dcad.sweep")


def remove_placement_group(group_id: str) -> bool:
    """Remove the placement group `group_id` (hex); whether it was removed. Never raises (best effort)."""
    try:
        import ray
        from ray.util.placement_group import PlacementGroup, remove_placement_group as remove

        remove(PlacementGroup(ray.PlacementGroupID.from_hex(group_id)))
        return True
    except Exception as err:  # noqa: BLE001 - already removed, or the cluster is going away: the sweep goes on
        logger.debug(f"placement group {group_id} not removed ({err})")
        return False


class PlacementGroupJanitor(Callback):
    """Removes the worker placement group of a trial that ended without finishing (stopped or failed)."""

    def on_trial_complete(self, iteration: int, trials: list, trial, **info) -> None:
        self._release(trial)

    def on_trial_error(self, iteration: int, trials: list, trial, **info) -> None:
        self._release(trial)

    @staticmethod
    def _release(trial) -> None:
        result = trial.last_result or {}
        group = result.get(PLACEMENT_GROUP_KEY)
        if group and result.get(DONE_KEY) != 1.0 and remove_placement_group(group):
            logger.info(f"released the placement group of stopped trial {trial.trial_id}")
