"""The running agent renders on start and on rotation; ``render --once`` exits 0 or 1."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from agent.render.renderer import Renderer
from tests.agentenv import AgentEnv


async def test_the_agent_renders_at_start_and_on_rotation(env: AgentEnv, tmpfs: Path) -> None:
    dest = tmpfs / "pw"
    env.put("prod/db", '{"password": "one"}')
    env.configure(templates=[{"destination": str(dest), "secret": "prod/db", "key": "password"}])
    async with env.running() as agent:
        for _ in range(500):
            if dest.exists():
                break
            await asyncio.sleep(0.01)
        assert dest.read_bytes() == b"one"
        env.put("prod/db", '{"password": "two"}')
        for _ in range(500):
            if dest.read_bytes() == b"two":
                break
            await asyncio.sleep(0.01)
        assert dest.read_bytes() == b"two"
        _, _, body = await agent.get("/v1/status")
        templates = json.loads(body)["templates"]
        assert templates[0]["destination"] == str(dest) and templates[0]["error"] is None


async def test_ready_means_every_template_is_rendered(
    env: AgentEnv, tmpfs: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A native sidecar's startup probe (``health --ready``) starts the app:
    its files must be there by then, however slow the render. A template whose
    render fails does not hold readiness (its error is in the status)."""
    dest, bad = tmpfs / "pw", tmpfs / "bad"
    env.put("prod/db", '{"password": "one"}')
    env.configure(
        templates=[
            {"destination": str(dest), "secret": "prod/db", "key": "password"},
            {"destination": str(bad), "secret": "prod/db", "key": "nope"},
        ]
    )
    original = Renderer.render_one

    async def slow(self: Renderer, t: Any) -> bool:
        await asyncio.sleep(0.5)
        return await original(self, t)

    monkeypatch.setattr(Renderer, "render_one", slow)
    async with env.running() as agent:
        assert dest.read_bytes() == b"one"
        assert not bad.exists()
        _, _, body = await agent.get("/v1/status")
        templates = json.loads(body)["templates"]
        assert templates[0]["error"] is None and "nope" in templates[1]["error"]


def test_a_bad_destination_stops_the_agent_at_start(env: AgentEnv, tmp_path: Path) -> None:
    env.put("prod/db", "v")
    env.configure(
        templates=[
            {"destination": str(tmp_path / "nodir" / "pw"), "secret": "prod/db", "allow_disk": True}
        ]
    )
    code, _, err = env.cli("run")
    assert code == 2
    assert "templates[0]" in err and "does not exist" in err


def test_render_once_exits_0_or_1_naming_the_failure(env: AgentEnv, tmpfs: Path) -> None:
    env.put("prod/db", '{"password": "pw"}')
    env.configure(
        templates=[{"destination": str(tmpfs / "pw"), "secret": "prod/db", "key": "password"}]
    )
    assert env.cli("render", "--once")[0] == 0
    assert (tmpfs / "pw").read_bytes() == b"pw"
    env.configure(
        templates=[{"destination": str(tmpfs / "pw"), "secret": "prod/db", "key": "nope"}]
    )
    code, _, err = env.cli("render", "--once")
    assert code == 1 and "templates[0]" in err and "no key 'nope'" in err
    assert (tmpfs / "pw").read_bytes() == b"pw"


async def test_a_reload_adds_and_removes_templates(env: AgentEnv, tmpfs: Path) -> None:
    env.put("prod/db", '{"password": "pw"}')
    first, second = tmpfs / "first", tmpfs / "second"
    env.configure(templates=[{"destination": str(first), "secret": "prod/db", "key": "password"}])
    async with env.running() as agent:
        for _ in range(500):
            if first.exists():
                break
            await asyncio.sleep(0.01)
        env.configure(
            templates=[{"destination": str(second), "secret": "prod/db", "format": "json"}]
        )
        agent.daemon.request_reload()
        for _ in range(500):
            if second.exists():
                break
            await asyncio.sleep(0.01)
        assert json.loads(second.read_bytes()) == {"password": "pw"}
        _, _, body = await agent.get("/v1/status")
        assert [t["destination"] for t in json.loads(body)["templates"]] == [str(second)]


async def test_an_edit_to_a_template_file_re_renders(env: AgentEnv, tmpfs: Path) -> None:
    """As consul-template does: no SIGHUP needed. Editors replace the file; both ways work."""
    env.put("prod/db", '{"password": "pw"}')
    template = env.dir / "app.tmpl"
    template.write_text("one={{ secret('prod/db', 'password') }}\n")
    dest = tmpfs / "app.conf"
    env.configure(
        templates=[
            {
                "destination": str(dest),
                "secrets": ["prod/db"],
                "format": "template",
                "template_file": str(template),
            }
        ]
    )

    async def rendered(expected: bytes) -> None:
        for _ in range(1000):  # bounded: 10 s at most
            if dest.exists() and dest.read_bytes() == expected:
                return
            await asyncio.sleep(0.01)
        raise AssertionError(f"not re-rendered: {dest.read_bytes()!r}")

    async with env.running():
        await rendered(b"one=pw\n")
        template.write_text("two={{ secret('prod/db', 'password') }}\n")  # in place
        await rendered(b"two=pw\n")
        replacement = env.dir / ".app.tmpl.new"
        replacement.write_text("three={{ secret('prod/db', 'password') }}\n")
        replacement.replace(template)  # as editors save
        await rendered(b"three=pw\n")
