"""An agent on etcd: pushed rotations, and an etcd outage served from cache."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import uuid
from typing import Any

import pytest

from tests.agentenv import AgentEnv

pytestmark = pytest.mark.integration

FAST = {
    "interval": "1s",
    "watch_interval": "2s",
    "backoff_initial": "200ms",
    "backoff_max": "500ms",
    "jitter": 0.1,
}


def _put(env: AgentEnv, name: str, value: str) -> int:
    """``secrets-agent put`` in its own process, as a writer elsewhere would run it.

    (Not in-process: grpc's asyncio support is tied to one event loop per
    process, and the agent under test already runs one.)
    """
    proc = subprocess.run(
        [sys.executable, "-m", "agent", "-c", str(env.config_path), "put", name, "--value", value],
        capture_output=True,
        timeout=60,
        check=False,
    )
    return proc.returncode


def _on_etcd(env: AgentEnv, server: Any) -> None:
    env.configure(
        store={
            "type": "etcd",
            "endpoints": [server.endpoint],
            "prefix": f"/agent-{uuid.uuid4().hex[:8]}",
            "timeout": "2s",
        },
        refresh=FAST,
    )


async def test_a_rotation_in_etcd_is_pushed_to_the_agent(env: AgentEnv, etcd_server: Any) -> None:
    _on_etcd(env, etcd_server)
    assert _put(env, "db", "v1") == 0
    async with env.running() as agent:
        assert await agent.value("db") == b"v1"
        assert await asyncio.to_thread(_put, env, "db", "v2") == 0
        await agent.eventually("db", b"v2", timeout=10)
        assert await agent.value("db", stage="PREVIOUS") == b"v1"
        watch_events = agent.daemon.metrics.registry.get_sample_value(
            "secrets_agent_watch_events_total", {"kind": "event"}
        )
        assert watch_events and watch_events >= 2  # the resync, then the push


async def test_an_etcd_outage_is_served_stale_and_a_rotation_after_it_is_picked_up(
    env: AgentEnv, etcd_server: Any
) -> None:
    _on_etcd(env, etcd_server)
    assert _put(env, "db", "v1") == 0
    async with env.running() as agent:
        assert await agent.value("db") == b"v1"
        etcd_server.stop()
        try:
            stale = failures = 0
            # About 3 s of reads while etcd is down (SA_OUTAGE_SECONDS=30 for the long run).
            for _ in range(int(float(os.environ.get("SA_OUTAGE_SECONDS", "3")) / 0.075)):
                status, headers, body = await agent.get("/v1/secrets/db", format="raw")
                failures += status != 200 or body != b"v1"
                stale += headers.get("X-Secret-Stale") == "true"
                await asyncio.sleep(0.075)
            assert failures == 0
            assert stale > 0
        finally:
            etcd_server.start()
        for _ in range(100):  # the writer retries until etcd answers again
            code = await asyncio.to_thread(_put, env, "db", "v2")
            if code == 0:
                break
            await asyncio.sleep(0.1)
        assert code == 0
        loop = asyncio.get_running_loop()
        started = loop.time()
        await agent.eventually("db", b"v2", timeout=15)
        # Within one backoff period (0.5 s max here) plus slack for a noisy CI machine.
        assert loop.time() - started < 5
        _, headers, _ = await agent.get("/v1/secrets/db")
        assert "X-Secret-Stale" not in headers
