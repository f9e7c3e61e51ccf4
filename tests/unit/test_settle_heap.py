"""A service's heap once wired (takeoff_server.main.settle_heap, docs/design.md §2): what start-up made is
frozen out of the collector's passes, and young collections run less often."""

from __future__ import annotations

import gc

from takeoff_server.main import YOUNG_COLLECTION_THRESHOLD, settle_heap


def test_start_ups_objects_leave_the_collectors_passes() -> None:
    threshold = gc.get_threshold()
    started_with = [object() for _ in range(3)]  # a service's start-up, as far as the collector knows
    tracked = [[item] for item in started_with]
    try:
        settle_heap()
        assert gc.get_freeze_count() > 0
        young, *older = gc.get_threshold()
        assert (young, older) == (YOUNG_COLLECTION_THRESHOLD, list(threshold[1:]))
        assert all(gc.is_tracked(box) for box in tracked)  # still tracked, only frozen: never collected
        generations = {id(entry) for generation in range(3) for entry in gc.get_objects(generation)}
        assert not generations & {id(box) for box in tracked}
    finally:
        gc.unfreeze()
        gc.set_threshold(*threshold)
