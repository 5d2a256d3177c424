"""Removing the placement groups that Ray Train leaves behind when Tune stops a trial early.

When ASHA (or Ctrl-C) stops a trial, Tune kills the trial's actor and with it the Ray Train controller;
the controller's worker placement group is not detached, but GCS only removes such a group once both
its creator actor *and* its creator job are dead, i.e. at the end of the sweep. Ray Train's own
`PlacementGroupCleaner` is meant to remove it, but it watches the controller through the Ray state API,
which needs the dashboard; without it, it only logs warnings (ray-project/ray#54305 is this deadlock:
the leaked CPUs let no further worker group start). `PlacementGroupJanitor`, a Tune callback on the
driver, removes every placement group of this job whose creator actor is dead, every few seconds.
Those groups can never be used again: their creator is gone.
"""

from __future__ import annotations

import logging
import time

from ray.tune import Callback

logger = logging.getLogger("dcad.sweep")
NIL_ACTOR = b"\xff" * 16
CHECK_EVERY_S = 5.0


def orphaned_placement_groups() -> list[bytes]:
    """Ids of this job's live placement groups (created or pending) whose creator actor has died."""
    import ray
    from ray._private.state import state
    from ray.core.generated import gcs_pb2

    job = bytes.fromhex(ray.get_runtime_context().get_job_id())
    table = gcs_pb2.PlacementGroupTableData
    live = (table.CREATED, table.PENDING, table.RESCHEDULING)
    out = []
    for raw in state._connect_and_get_accessor().get_placement_group_table():
        pg = table.FromString(raw)
        creator = bytes(pg.creator_actor_id)
        if (pg.state in live and not pg.is_detached and pg.creator_actor_dead and creator and creator != NIL_ACTOR[: len(creator)]
                and bytes(pg.creator_job_id) == job):
            out.append(bytes(pg.placement_group_id))
    return out


def remove_orphaned_placement_groups() -> int:
    """Remove the orphans (see `orphaned_placement_groups`); how many. Never raises (best effort)."""
    try:
        from ray._raylet import PlacementGroupID
        from ray.util.placement_group import PlacementGroup, remove_placement_group

        orphans = orphaned_placement_groups()
        for pg_id in orphans:
            remove_placement_group(PlacementGroup(PlacementGroupID(pg_id)))
        return len(orphans)
    except Exception as err:  # noqa: BLE001 - Ray internals may change; the sweep must go on
        logger.debug(f"placement group cleanup skipped ({err})")
        return 0


class PlacementGroupJanitor(Callback):
    """Runs `remove_orphaned_placement_groups` on the driver at most every CHECK_EVERY_S seconds."""

    def __init__(self) -> None:
        self._last = 0.0

    def __getstate__(self) -> dict:
        return {"_last": 0.0}

    def on_step_begin(self, iteration: int, trials: list, **info) -> None:
        now = time.monotonic()
        if now - self._last < CHECK_EVERY_S:
            return
        self._last = now
        removed = remove_orphaned_placement_groups()
        if removed:
            logger.info(f"released {removed} placement group(s) left by stopped trials")
