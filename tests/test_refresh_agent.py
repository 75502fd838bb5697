"""Refresh in a running agent on the directory store: outages, max_stale, reload."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from pathlib import Path

import pytest
import yaml

from tests.agentenv import AgentEnv

FAST = {
    "interval": "1s",
    "watch_interval": "1s",
    "backoff_initial": "200ms",
    "backoff_max": "400ms",
    "jitter": 0.1,
}


def _writer_config(env: AgentEnv, store: Path) -> Path:
    """A second config over ``store`` (as a writer elsewhere would have)."""
    doc = yaml.safe_load(env.config_path.read_text())
    doc["store"] = {"type": "file", "path": str(store)}
    path = env.dir / "writer.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


async def test_store_outage_serves_stale_logs_per_backoff_step_and_recovers(
    env: AgentEnv, caplog: pytest.LogCaptureFixture
) -> None:
    env.put("db", "v1")
    env.configure(refresh=FAST)
    store, away = env.dir / "store", env.dir / "store.away"
    with caplog.at_level(logging.INFO):
        async with env.running() as agent:
            assert await agent.value("db") == b"v1"
            os.rename(store, away)  # the store is "down" (root can read any mode)
            stale_seen = 0
            for _ in range(40):  # about 2 s: several backoff periods
                status, headers, body = await agent.get("/v1/secrets/db", format="raw")
                assert status == 200 and body == b"v1"
                stale_seen += headers.get("X-Secret-Stale") == "true"
                await asyncio.sleep(0.05)
            assert stale_seen > 0
            # A rotation made while the agent cannot see the store.
            writer = _writer_config(env, away)
            from agent.cli import main

            loop = asyncio.get_running_loop()
            code = await loop.run_in_executor(
                None, main, ["-c", str(writer), "put", "db", "--value", "v2"]
            )
            assert code == 0
            os.rename(away, store)
            started = loop.time()
            await agent.eventually("db", b"v2", timeout=10)
            picked_up = loop.time() - started
            _, headers, _ = await agent.get("/v1/secrets/db")
            assert "X-Secret-Stale" not in headers
    outage_logs = [
        r for r in caplog.records if "unavailable" in r.getMessage() and r.name == "agent.refresh"
    ]
    # Logged once per backoff step (about 2 s / 0.2-0.4 s), never once per request (40).
    assert 1 <= len(outage_logs) <= 15, len(outage_logs)
    assert picked_up < 5.0  # one backoff period (0.4 s) plus generous slack for CI noise
    assert any("available again" in r.getMessage() for r in caplog.records)


async def test_past_max_stale_reads_answer_503_then_recover(env: AgentEnv) -> None:
    env.put("db", "v1")
    env.configure(refresh={**FAST, "max_stale": "500ms"})
    store, away = env.dir / "store", env.dir / "store.away"
    async with env.running() as agent:
        assert await agent.value("db") == b"v1"
        os.rename(store, away)
        status = 200
        headers: dict[str, str] = {}
        for _ in range(100):
            status, headers, _ = await agent.get("/v1/secrets/db")
            if status == 503:
                break
            await asyncio.sleep(0.05)
        assert status == 503
        assert int(headers["Retry-After"]) >= 1
        os.rename(away, store)
        await agent.eventually("db", b"v1", timeout=10)


async def test_invalid_reload_keeps_the_old_config(
    env: AgentEnv, caplog: pytest.LogCaptureFixture
) -> None:
    env.put("a", "va")
    async with env.running() as agent:
        good = env.config_path.read_text()
        env.config_path.write_text(good + "\nbogus_field: 1\n")
        with caplog.at_level(logging.ERROR):
            agent.daemon.request_reload()
        assert "config reload rejected" in caplog.text and "bogus_field" in caplog.text
        assert agent.daemon.config.secrets == ["*"]
        assert await agent.value("a") == b"va"
        env.config_path.write_text(good)


async def test_reload_adds_and_removes_secrets_without_dropping_connections(env: AgentEnv) -> None:
    env.put("keep/a", "va")
    env.put("new/b", "vb")
    env.configure(secrets=["keep/*"], refresh=FAST)
    async with env.running() as agent:
        assert agent.daemon.cache.names() == ["keep/a"]
        connector = agent.session.connector
        assert await agent.value("keep/a") == b"va"
        env.configure(secrets=["new/*"], refresh=FAST)
        os.kill(os.getpid(), signal.SIGHUP)  # the daemon's handler reloads
        for _ in range(200):
            if agent.daemon.cache.names() == ["new/b"]:
                break
            await asyncio.sleep(0.02)
        assert agent.daemon.cache.names() == ["new/b"]
        assert agent.session.connector is connector
        assert await agent.value("new/b") == b"vb"
        reloads = agent.daemon.metrics.registry.get_sample_value(
            "secrets_agent_config_reloads_total", {"outcome": "applied"}
        )
        assert reloads and reloads >= 1


async def test_a_change_of_the_config_file_reloads_it(env: AgentEnv) -> None:
    env.put("x/a", "va")
    env.configure(secrets=[])
    async with env.running() as agent:
        assert agent.daemon.cache.names() == []
        env.configure(secrets=["x/*"])
        for _ in range(300):
            if agent.daemon.cache.names() == ["x/a"]:
                break
            await asyncio.sleep(0.02)
        assert agent.daemon.cache.names() == ["x/a"]
