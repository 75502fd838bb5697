"""The scheduler stops when cancelled, even when a wake-up lands in the same instant."""

from __future__ import annotations

import asyncio

from agent.config import RotationConfig
from agent.rotation.scheduler import RotationScheduler
from tests.rotation.helpers import World


async def test_a_cancel_that_lands_with_a_wake_up_stops_the_scheduler() -> None:
    # On Python 3.11 asyncio.wait_for swallows a cancel that arrives as the
    # awaited future completes (cpython gh-86296); the scheduler slept in one,
    # so a reload's wake-up at shutdown left it running for ever (seen in CI as
    # a 120 s hang of five racing schedulers on etcd).
    world = World()
    await world.engine().writer.put("app/db", b"initial")
    rule = RotationConfig.model_validate(
        {"secret": "app/db", "every": "1h", "rotator": "random", "params": {"length": 16}}
    )
    scheduler = RotationScheduler(world.engine(), [rule], metrics=world.metrics)
    task = asyncio.create_task(scheduler.run())
    for _ in range(200):  # until it has checked the rule and gone to sleep
        if scheduler.states["app/db"].next_at > 0:
            break
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.05)
    scheduler._wake.set()
    task.cancel()
    done, _ = await asyncio.wait([task], timeout=10)  # a liveness bound
    assert done, "the scheduler ignored its cancel"
    assert task.cancelled()
