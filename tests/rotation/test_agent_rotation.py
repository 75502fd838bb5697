"""Scheduled rotation in a running agent: served, rendered, flagged when failing."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import stat
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from tests.agentenv import AgentEnv, RunningAgent

pytestmark = pytest.mark.integration

FAST = {"interval": "1s", "backoff_initial": "200ms", "backoff_max": "500ms"}


async def until(check: Callable[[], Awaitable[bool]], timeout: float = 15) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        if await check():
            return
        await asyncio.sleep(0.02)
    raise AssertionError("condition not reached in time")


async def rotation_status(agent: RunningAgent) -> dict[str, Any]:
    _, _, body = await agent.get("/v1/status")
    return dict(json.loads(body))


async def test_a_scheduled_rotation_is_served_on_the_socket_and_reaches_a_rendered_file(
    env: AgentEnv, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    dest = env.dir / "rendered" / "pw"
    dest.parent.mkdir(mode=0o700)
    env.configure(
        refresh=FAST,
        rotation=[
            {
                "secret": "app/db",
                "every": "1s",
                "rotator": "random",
                "params": {"key": "password", "length": 24},
            }
        ],
        templates=[
            {"destination": str(dest), "secret": "app/db", "key": "password", "allow_disk": True}
        ],
    )
    env.put("app/db", json.dumps({"username": "app", "password": "initial"}))
    async with env.running() as agent:
        seen: set[bytes] = set()

        async def rotated_twice() -> bool:
            body = await agent.value("app/db", key="password")
            if body is not None and body != b"initial":
                seen.add(body)
            return len(seen) >= 2

        await until(rotated_twice)

        async def rendered() -> bool:
            served = await agent.value("app/db", key="password")
            return dest.exists() and dest.read_bytes() == served and served != b"initial"

        await until(rendered)
        doc = json.loads((await agent.value("app/db")) or b"{}")
        assert doc["username"] == "app" and len(doc["password"]) == 24
        status = await rotation_status(agent)
        entry = status["rotation"][0]
        assert entry["secret"] == "app/db" and entry["failures_in_a_row"] == 0
        assert entry["last_success"] and entry["next_at"] and status["rotation_failing"] == []
        metrics = agent.daemon.metrics.registry
        assert (
            metrics.get_sample_value(
                "secrets_agent_rotation_last_success_timestamp_seconds", {"secret": "app/db"}
            )
            or 0
        ) > 0
        assert (
            metrics.get_sample_value(
                "secrets_agent_rotation_steps_total",
                {"secret": "app/db", "step": "finish", "outcome": "ok"},
            )
            or 0
        ) >= 2
        # No value in the status document, the metrics, the audit log or the log.
        _, _, body = await agent.get("/v1/status")
        _, _, metrics_text = await agent.get("/metrics")
        audit = (env.dir / "audit.log").read_bytes()
        assert b'"event":"rotated"' in audit and b'"event":"rotation_step"' in audit
        logged = "\n".join(r.getMessage() for r in caplog.records).encode()
        for value in seen:
            for text in (body, metrics_text, audit, logged):
                assert value not in text


async def test_a_failing_rotation_keeps_current_is_flagged_and_recovers(env: AgentEnv) -> None:
    fail = env.dir / "fail-set"
    script = env.dir / "rot.sh"
    script.write_text(
        "#!/bin/sh\n"
        'if [ "$1" = create ]; then echo "rotated-$3"; fi\n'
        f'if [ "$1" = set ] && [ -e {fail} ]; then exit 1; fi\n'
    )
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    env.configure(
        refresh=FAST,
        rotation=[
            {
                "secret": "app/key",
                "every": "1h",
                "rotator": "command",
                "params": {"command": str(script)},
                "flag_after_failures": 2,
            }
        ],
    )
    env.put("app/key", "initial")
    fail.touch()
    # Make the rotation due now: CURRENT must predate the slot, so use a 1h slot
    # and a version created before it by backdating the version file.
    versions = list((env.dir / "store").rglob("versions/*.json"))
    for v in versions:
        os.utime(v, (1_000_000, 1_000_000))
    async with env.running() as agent:

        async def flagged() -> bool:
            return "app/key" in (await rotation_status(agent))["rotation_failing"]

        await until(flagged)
        entry = (await rotation_status(agent))["rotation"][0]
        assert entry["failed_step"] == "set" and entry["failures_in_a_row"] >= 2
        assert entry["pending_version"] and "status 1" in entry["last_error"]
        assert await agent.value("app/key") == b"initial"
        # The failure series: failed steps and attempts counted, failures in a row,
        # and the next time is the retry after backoff (well before the 1h slot ends).
        metric = agent.daemon.metrics.registry.get_sample_value
        label = {"secret": "app/key"}
        assert (metric("secrets_agent_rotation_failures_in_a_row", label) or 0) >= 2
        assert (metric("secrets_agent_rotations_total", {**label, "outcome": "failed"}) or 0) >= 2
        failed_set = {**label, "step": "set", "outcome": "failed"}
        assert (metric("secrets_agent_rotation_steps_total", failed_set) or 0) >= 2
        retry_at = metric("secrets_agent_rotation_next_timestamp_seconds", label) or 0
        assert time.time() - 5 < retry_at < time.time() + 1800
        # describe shows the running agent's view of the rotation.
        code, out, _ = await asyncio.to_thread(env.cli, "describe", "app/key", "--json")
        rot = json.loads(out)["rotation"]
        assert code == 0 and rot["pending_version"] == entry["pending_version"]
        assert rot["agent"]["failing"] is True and rot["agent"]["failed_step"] == "set"
        assert rot["agent"]["failures_in_a_row"] >= 2
        code, text, _ = await asyncio.to_thread(env.cli, "describe", "app/key")
        assert code == 0 and "last result: failed at step set" in text
        assert "(FAILING)" in text and "next check by the agent: 20" in text
        fail.unlink()

        async def recovered() -> bool:
            value = await agent.value("app/key")
            return value is not None and value.startswith(b"rotated-")

        await until(recovered, timeout=20)
        await until(lambda: _not_flagged(agent))
        entry = (await rotation_status(agent))["rotation"][0]
        assert entry["failures_in_a_row"] == 0 and entry["last_result"] == "rotated"
        assert metric("secrets_agent_rotation_failures_in_a_row", label) == 0
        # Rotated in this 1h slot: the next check is the next slot's start (or, had
        # the hour turned meanwhile, the start of this one).
        next_slot = (time.time() // 3600 + 1) * 3600
        next_at = metric("secrets_agent_rotation_next_timestamp_seconds", label)
        assert next_at in (next_slot, next_slot - 3600)


async def _not_flagged(agent: RunningAgent) -> bool:
    return (await rotation_status(agent))["rotation_failing"] == []


async def test_rotation_rules_follow_a_config_reload(env: AgentEnv) -> None:
    env.put("app/a", "initial")
    async with env.running() as agent:
        assert agent.daemon.rotation.states == {}
        env.configure(
            refresh=FAST,
            rotation=[{"secret": "app/a", "every": "1s", "rotator": "random"}],
        )
        agent.daemon.request_reload()
        assert set(agent.daemon.rotation.states) == {"app/a"}

        async def rotated() -> bool:
            value = await agent.value("app/a")
            return value not in (None, b"initial")

        await until(rotated)


async def test_the_rotating_agent_serves_its_own_rotation_at_once_without_watch_or_poll(
    env: AgentEnv,
) -> None:
    env.configure(
        refresh={"watch": False, "interval": "1h"},
        rotation=[{"secret": "app/t", "every": "1s", "rotator": "random"}],
    )
    env.put("app/t", "initial")
    async with env.running() as agent:

        async def rotated() -> bool:
            return await agent.value("app/t") not in (None, b"initial")

        await until(rotated, timeout=10)
