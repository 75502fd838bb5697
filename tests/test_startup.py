"""Start-up and resync at scale: one pass, watches and polls from its state, cheap resyncs."""

from __future__ import annotations

import asyncio
import json

import pytest

from agent.daemon import Daemon
from agent.errors import ConfigError
from tests.agentenv import AgentEnv, RunningAgent

COUNT = 120


def _import(env: AgentEnv, count: int) -> None:
    doc = {f"app/s{i:04d}": f"value-{i}" for i in range(count)}
    path = env.dir / "import.json"
    path.write_text(json.dumps(doc))
    code, _, err = env.cli("import", str(path))
    assert code == 0, err


def _sample(agent: RunningAgent, name: str, **labels: str) -> float:
    registry = agent.daemon.metrics.registry
    total = 0.0
    for metric in registry.collect():
        for s in metric.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
    return total


async def _until(check: object, timeout: float = 15) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not check():  # type: ignore[operator]
        assert loop.time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.05)


async def test_startup_reads_each_secret_once_and_the_watch_starts_from_that_state(
    env: AgentEnv,
) -> None:
    _import(env, COUNT)
    env.configure(refresh={"interval": "1h", "watch_interval": "1h"})
    async with env.running() as agent:
        # The watch, once established, confirms every secret by its marker (a stat).
        await _until(
            lambda: (
                _sample(agent, "secrets_agent_version_checks_total", outcome="unchanged") >= COUNT
            )
        )
        assert _sample(agent, "secrets_agent_refreshes_total") == COUNT
        assert _sample(agent, "secrets_agent_refreshes_total", outcome="loaded") == COUNT
        reads = _sample(agent, "secrets_agent_store_operations_total", operation="read_stages")
        assert reads == COUNT
        # The proof's key envelope is the CURRENT one, read in the same batch.
        versions = _sample(agent, "secrets_agent_store_operations_total", operation="read_version")
        assert versions == COUNT
        # Still watching: a rotation arrives, read alone.
        env.put("app/s0007", "rotated")
        await agent.eventually("app/s0007", b"rotated")
        after = _sample(agent, "secrets_agent_store_operations_total", operation="read_stages")
        assert 1 <= after - reads <= 3


async def test_a_resync_reads_again_only_what_changed(env: AgentEnv) -> None:
    _import(env, COUNT)
    env.configure(refresh={"watch": False, "interval": "1h"})
    async with env.running() as agent:
        before = _sample(agent, "secrets_agent_store_operations_total", operation="read_stages")
        for i in (3, 50, 99):
            env.put(f"app/s{i:04d}", f"new-{i}")
        await agent.daemon.refresher.resync(trigger="poll")
        after = _sample(agent, "secrets_agent_store_operations_total", operation="read_stages")
        assert after - before == 3
        for i in (3, 50, 99):
            assert await agent.value(f"app/s{i:04d}") == f"new-{i}".encode()
        assert await agent.value("app/s0004") == b"value-4"
        assert _sample(agent, "secrets_agent_refreshes_total", trigger="poll") == 3


async def test_the_stale_gauge_is_kept_as_entries_turn_stale_and_fresh(env: AgentEnv) -> None:
    _import(env, 5)
    env.configure(refresh={"watch": False, "interval": "1h"})
    async with env.running() as agent:
        store, away = env.dir / "store", env.dir / "store.away"
        store.rename(away)
        await agent.daemon.refresher.resync(trigger="poll")
        assert _sample(agent, "secrets_agent_cache_stale_secrets") == 5
        away.rename(store)
        await agent.daemon.refresher.resync(trigger="poll")
        assert _sample(agent, "secrets_agent_cache_stale_secrets") == 0


async def test_a_second_agent_on_the_same_socket_fails_and_leaves_the_first_one_serving(
    env: AgentEnv,
) -> None:
    """The refused start used to unlink the live agent's socket on its way out."""
    env.put("app/a", "v")
    async with env.running() as agent:
        second = Daemon(env.config())
        with pytest.raises(ConfigError, match="another process is listening"):
            await asyncio.wait_for(second.run(), 30)
        assert env.socket.is_socket()
        status, _, _ = await agent.get("/healthz")
        assert status == 200
    assert not env.socket.exists()  # the first one removes its own socket on exit
