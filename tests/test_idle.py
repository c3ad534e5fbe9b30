"""An idle gateway does not wake up for nothing: the stale check sleeps until a device
could be due instead of ticking every second. (What idle costs is measured by
`python -m bench idle_cpu`, never here.)"""

from __future__ import annotations

import asyncio
import time

from gateway.hub import FieldSpec, Health, Hub


def hub_with(*stale_after: float | None) -> Hub:
    hub = Hub()
    for n, after in enumerate(stale_after):
        hub.add_node(f"d{n}", f"D{n}", "simulated", [FieldSpec("temp")], after)
    return hub


def test_stale_check_sleeps_until_the_first_deadline() -> None:
    hub = hub_with(30.0, 10.0, None)
    hub.push("d0", "temp", 1.0)
    hub.push("d1", "temp", 1.0)
    seen = hub.nodes["d1"].seen_at
    assert seen is not None
    # d1 is due 10 s after its reading; d0 later; d2 never.
    assert abs(hub.stale_due(now=seen + 4) - 6) < 0.01
    # Past a deadline: at once.
    assert hub.stale_due(now=seen + 11) == 0.0


def test_without_stale_after_it_wakes_rarely() -> None:
    assert hub_with(None, None).stale_due() == 60.0
    assert hub_with(None).stale_due(longest=5.0) == 5.0


def test_a_stale_device_back_to_ok_is_still_watched_in_time() -> None:
    hub = hub_with(8.0)
    node = hub.nodes["d0"]
    hub.push("d0", "temp", 1.0)
    assert node.seen_at is not None
    hub.check_stale(now=node.seen_at + 9)
    assert node.health.state is Health.STALE
    # Nothing can be due while the only device is stale, but it may come back at any moment:
    # the check never sleeps longer than its stale_after.
    assert hub.stale_due(now=node.seen_at + 9) == 8.0


async def test_watch_stale_marks_a_silent_device() -> None:
    hub = hub_with(0.2)
    hub.push("d0", "temp", 1.0)
    task = asyncio.create_task(hub.watch_stale())
    try:
        deadline = time.monotonic() + 10
        while hub.nodes["d0"].health.state is not Health.STALE and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert (hub.nodes["d0"].health.state, hub.nodes["d0"].health.reason) == (Health.STALE, "no data for 0.2 s")
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
