"""Five agents with the same schedule racing on one store make one new version per slot."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import pytest

from agent.config import AgentConfig
from agent.core import Core
from agent.rotation.engine import RotationEngine
from agent.rotation.schedule import Schedule
from agent.rotation.scheduler import RotationScheduler, build_rotator
from agent.types import CURRENT, PREVIOUS
from tests.agentenv import AgentEnv

pytestmark = pytest.mark.integration

AGENTS = 5
RUN_FOR = 4.6  # seconds: four or five 1 s slots


async def race(config: AgentConfig, name: str) -> tuple[list[str], dict[str, str], set[str]]:
    """Run five schedulers (each its own store client and data keys) for a few slots."""
    cores = [Core.build(config) for _ in range(AGENTS)]
    try:
        schedulers = [
            RotationScheduler(
                RotationEngine(core.writer(), core.resolver, metrics=core.metrics),
                config.rotation,
                metrics=core.metrics,
            )
            for core in cores
        ]
        started = time.time()
        tasks = [asyncio.create_task(s.run()) for s in schedulers]
        await asyncio.sleep(RUN_FOR)
        for t in tasks:
            t.cancel()
        # Liveness bounds (not timings): a hang names its phase instead of
        # running into pytest's timeout.
        _, running = await asyncio.wait(tasks, timeout=30)
        assert not running, f"{len(running)} schedulers did not stop when cancelled"
        ended = time.time()
        slots = slots_between(name, started, ended)
        store = cores[0].store
        async with asyncio.timeout(30):
            stages = dict((await store.read_stages(name)).stages)
            if "PENDING" in stages:
                # The cancel interrupted a rotation (allowed: a PENDING is
                # resumed on the next run). It must be a slot's version, and a
                # new engine must finish it with that token, not make another.
                pending = stages["PENDING"]
                assert pending in slots_between(name, started, ended), stages
                engine = RotationEngine(cores[0].writer(), cores[0].resolver)
                result = await engine.rotate(name, build_rotator(config.rotation[0]))
                assert (result.token, result.outcome) == (pending, "rotated"), result
                stages = dict((await store.read_stages(name)).stages)
            versions = [v for v, _ in await store.list_versions(name)]
            # Every version decrypts (no half-written envelope).
            for v in versions:
                await cores[0].resolver.fetch(name, v)
        return versions, stages, slots
    finally:
        async with asyncio.timeout(30):
            await asyncio.gather(*(core.aclose() for core in cores))


def slots_between(name: str, started: float, ended: float) -> set[str]:
    """The version ids (tokens) of every 1 s slot the race ran in."""
    schedule = Schedule(every=1)
    slots = set()
    t = started
    while t <= ended + 1:
        slots.add(schedule.slot_at(t).token(name))
        t += 0.25
    return slots


def check(versions: list[str], stages: dict[str, str], slots: set[str], first: str) -> None:
    new = [v for v in versions if v != first]
    seen = f"versions {versions}, stages {stages}, slot tokens {sorted(slots)}"
    assert len(new) >= 2, seen  # the agents rotated in several slots
    assert len(new) == len(set(new)), seen
    assert set(new) <= slots, f"a version that is not a slot's token (a duplicate): {seen}"
    assert stages[CURRENT] in new and "PENDING" not in stages, seen
    assert stages[PREVIOUS] in versions, seen


def rule(name: str) -> dict[str, Any]:
    return {"secret": name, "every": "1s", "rotator": "random", "params": {"length": 16}}


async def test_five_agents_on_one_directory_make_one_version_per_slot(env: AgentEnv) -> None:
    env.configure(rotation=[rule("app/db")])
    first = env.put("app/db", "initial")
    versions, stages, slots = await race(env.config(), "app/db")
    check(versions, stages, slots, first)


async def test_five_agents_on_etcd_make_one_version_per_slot(
    env: AgentEnv, etcd_server: Any
) -> None:
    env.configure(
        store={
            "type": "etcd",
            "endpoints": [etcd_server.endpoint],
            "prefix": f"/race-{uuid.uuid4().hex[:8]}",
            "timeout": "2s",
        },
        rotation=[rule("app/db")],
    )
    config = env.config()
    core = Core.build(config)
    try:
        first = (await core.writer().put("app/db", b"initial")).version_id
    finally:
        await core.aclose()
    versions, stages, slots = await race(config, "app/db")
    check(versions, stages, slots, first)
