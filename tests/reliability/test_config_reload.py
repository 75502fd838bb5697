"""Finding 1: config edits must never kill the agent or switch its config watch off.

Regression tests, each on a real running agent (a real config file, watched by
watchfiles, and real signals): before the fix, reloading a template with
``secrets: [a, b]`` or ``on_change.command`` raised ``TypeError: unhashable
type: 'list'`` and the agent exited; SIGHUP logged an "Exception in callback"
traceback; a Latin-1 byte raised UnicodeDecodeError and exited; a 100k-deep
YAML file ended config watching for the rest of the run.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.agentenv import AgentEnv, RunningAgent
from tests.render.conftest import tmpfs  # noqa: F401 - a fixture

pytestmark = pytest.mark.timeout(90)


def _reloads(agent: RunningAgent, outcome: str) -> float:
    registry = agent.daemon.metrics.registry
    return (
        registry.get_sample_value("secrets_agent_config_reloads_total", {"outcome": outcome}) or 0
    )


async def _until(predicate: Callable[[], bool], timeout: float = 15.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        assert loop.time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.02)


def _multi_template(env: AgentEnv, out: Path) -> dict[str, Any]:
    return {
        "destination": str(out / "app.env"),
        "secrets": ["a", "b"],
        "format": "template",
        "template": "A={{ secrets['a'] }}\nB={{ secrets['b'] }}\n",
        "on_change": {"command": ["true"], "timeout": "5s"},
    }


def _edit(env: AgentEnv, mutate: Callable[[dict[str, Any]], None]) -> None:
    doc = yaml.safe_load(env.config_path.read_text())
    mutate(doc)
    env.config_path.write_text(yaml.safe_dump(doc))


async def _alive(agent: RunningAgent) -> None:
    status, _, _ = await agent.get("/healthz")
    assert status == 200
    assert await agent.value("a") == b"1"


async def test_an_edit_of_a_config_with_list_templates_is_applied_not_fatal(
    env: AgentEnv,
    tmpfs: Path,  # noqa: F811
) -> None:
    env.put("a", "1")
    env.put("b", "2")
    env.configure(templates=[_multi_template(env, tmpfs)])
    async with env.running() as agent:
        await _until(lambda: (tmpfs / "app.env").exists())
        _edit(env, lambda d: d["log"].update(level="debug"))
        await _until(lambda: _reloads(agent, "applied") >= 1)
        await _alive(agent)
        env.put("b", "3")
        await _until(lambda: (tmpfs / "app.env").read_text() == "A=1\nB=3\n")


async def test_sighup_with_list_templates_applies_without_a_callback_traceback(
    env: AgentEnv,
    tmpfs: Path,  # noqa: F811
    caplog: pytest.LogCaptureFixture,
) -> None:
    env.put("a", "1")
    env.put("b", "2")
    env.configure(templates=[_multi_template(env, tmpfs)])
    async with env.running() as agent:
        caplog.set_level(logging.INFO)

        # Change what the template says, so the new config is really in force.
        def change(d: dict[str, Any]) -> None:
            d["templates"][0]["template"] = "B={{ secrets['b'] }}\n"

        _edit(env, change)
        os.kill(os.getpid(), signal.SIGHUP)
        await _until(lambda: (tmpfs / "app.env").read_text() == "B=2\n")
        await _alive(agent)
    assert not [r for r in caplog.records if "Exception in callback" in r.getMessage()]


async def test_a_latin1_byte_is_rejected_naming_the_file_and_the_old_config_kept(
    env: AgentEnv, caplog: pytest.LogCaptureFixture
) -> None:
    env.put("a", "1")
    async with env.running() as agent:
        caplog.set_level(logging.ERROR, logger="agent.daemon")
        with env.config_path.open("ab") as f:
            f.write(b"# caf\xe9\n")
        await _until(lambda: _reloads(agent, "rejected") >= 1)
        await _alive(agent)
        os.kill(os.getpid(), signal.SIGHUP)
        await _until(lambda: _reloads(agent, "rejected") >= 2)
        await _alive(agent)
    lines = [r.getMessage() for r in caplog.records if "rejected" in r.getMessage()]
    assert lines and str(env.config_path) in lines[0] and "UTF-8" in lines[0]


async def test_a_100k_deep_yaml_is_rejected_and_watching_continues(
    env: AgentEnv, caplog: pytest.LogCaptureFixture
) -> None:
    env.put("a", "1")
    good = env.config_path.read_text()
    async with env.running() as agent:
        caplog.set_level(logging.ERROR, logger="agent.daemon")
        env.config_path.write_text("[" * 100_000 + "]" * 100_000)
        await _until(lambda: _reloads(agent, "rejected") >= 1)
        await _alive(agent)
        env.config_path.write_text(good.replace("level: info", "level: warning"))
        await _until(lambda: _reloads(agent, "applied") >= 1)
        assert agent.daemon.config.log.level == "warning"
        await _alive(agent)
    assert any("nested" in r.getMessage() for r in caplog.records)
