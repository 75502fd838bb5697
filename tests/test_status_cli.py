"""`secrets-agent status` prints aligned tables; `--json` the raw document."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from asyncio.subprocess import PIPE

import pytest

from agent.cli import build_parser, main
from agent.commands.admin import format_status
from tests.agentenv import AgentEnv

DOC = {
    "ready": True,
    "secrets": [
        {
            "name": "prod/db",
            "version_id": "v2",
            "stages": {"CURRENT": "v2", "PREVIOUS": "v1"},
            "age_seconds": 12.5,
            "last_refresh": "2026-12-01T23:15:14.123456+00:00",
            "stale": False,
            "last_error": None,
        },
        {
            "name": "api/token-with-a-long-name",
            "version_id": "0f4c1d2e",
            "stages": {"CURRENT": "0f4c1d2e"},
            "age_seconds": 4000,
            "last_refresh": None,
            "stale": True,
            "last_error": "store unavailable",
        },
    ],
    "templates": [
        {
            "name": "db",
            "destination": "/run/secrets/db",
            "renders": 3,
            "last_render": "2026-12-01T23:15:15+00:00",
            "last_notify": None,
            "error": None,
        }
    ],
    "audit": {"enabled": False},
}


def test_status_table_is_aligned_and_shows_state() -> None:
    lines = format_status(DOC).splitlines()
    assert lines[0] == "ready: yes"
    header, db, api = lines[2], lines[3], lines[4]
    for column in ("VERSION", "STAGES", "CHECKED", "LAST REFRESH", "STATE"):
        at = header.index(column)
        assert db[at - 1] == " " and api[at - 1] == " "  # every row starts its cells there
    assert "CURRENT,PREVIOUS" not in db  # only the stages on the CURRENT version
    assert " CURRENT " in db and " v2 " in db and "12s ago" in db
    assert "2026-12-01 23:15:14" in db and db.endswith("ok")
    assert "STALE (store unavailable)" in api and "67m ago" in api
    assert lines[6].startswith("TEMPLATE") and lines[7].startswith("db ")
    assert "2026-12-01 23:15:15" in lines[7] and lines[7].endswith("ok")


def test_status_says_why_details_are_hidden_from_a_caller_no_rule_names() -> None:
    out = format_status({"ready": True})
    assert out.startswith("ready: yes\n")
    assert "no secrets loaded" not in out
    assert f"no access rule names this caller (uid {os.geteuid()})" in out
    assert f"uids: [{os.geteuid()}], stages: []" in out


async def test_a_rule_with_no_stages_shows_status_but_reads_no_value(env: AgentEnv) -> None:
    """The operator's grant the hint suggests: status in full, every value read refused."""
    env.put("prod/db", "v")
    env.configure(access=[{"secrets": ["*"], "uids": [os.geteuid()], "stages": []}])
    async with env.running() as agent:
        code, out, err = await asyncio.to_thread(env.cli, "status")
        assert code == 0, err
        assert "prod/db" in out and "details hidden" not in out
        status, _, _ = await agent.get("/v1/secrets/prod/db")
        assert status == 403
        assert await agent.value("prod/db") is None


async def test_status_json_is_the_api_document(env: AgentEnv) -> None:
    env.put("prod/db", "v")
    async with env.running():
        # in a thread: the agent answers from this test's event loop
        code, out, err = await asyncio.to_thread(env.cli, "status", "--json")
        assert code == 0, err
        doc = json.loads(out)
        assert doc["ready"] is True and doc["secrets"][0]["name"] == "prod/db"
        code, out, _ = await asyncio.to_thread(env.cli, "status")
        assert code == 0
        assert out.splitlines()[0] == "ready: yes"
        assert "prod/db" in out and "CURRENT" in out


async def test_health_wait_keeps_checking_until_the_agent_is_ready(env: AgentEnv) -> None:
    """`health --ready --wait 60s` started before the agent exits 0 once it is ready."""
    env.put("prod/db", "v")
    cmd = [sys.executable, "-m", "agent", "-c", str(env.config_path), "health", "--ready"]
    once = await asyncio.create_subprocess_exec(*cmd, stdout=PIPE, stderr=PIPE)
    _, err = await asyncio.wait_for(once.communicate(), 60)
    assert once.returncode == 1 and b"cannot reach the agent" in err
    waiting = await asyncio.create_subprocess_exec(*cmd, "--wait", "60s", stdout=PIPE, stderr=PIPE)
    try:
        await asyncio.sleep(1.5)
        assert waiting.returncode is None  # still checking: no agent yet
        async with env.running():
            out, err = await asyncio.wait_for(waiting.communicate(), 60)
    finally:
        if waiting.returncode is None:
            waiting.kill()
            await waiting.wait()
    assert waiting.returncode == 0, err
    assert b"ready" in out


def _commands(parser=None, prefix=()):  # type: ignore[no-untyped-def]
    import argparse

    parser = parser or build_parser()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help for a in action._choices_actions}
            for name, sub in action.choices.items():
                yield (*prefix, name), helps.get(name), sub
                yield from _commands(sub, (*prefix, name))


@pytest.mark.parametrize("command", [c for c, _, _ in _commands()], ids=" ".join)
def test_every_command_has_a_short_help(command: tuple[str, ...], capsys) -> None:  # type: ignore[no-untyped-def]
    helps = {c: h for c, h, _ in _commands()}
    assert helps[command], f"{' '.join(command)} has no one-line help"
    assert len(helps[command]) <= 80
    assert main([*command, "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: secrets-agent")
    # its own --help says what it does, and every argument says what it is
    assert not out.split("\n\n")[1].startswith(("positional arguments", "options"))
    parser = {c: p for c, _, p in _commands()}[command]
    common = ("-h", "-c", "--debug")
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            continue
        if not action.option_strings or action.option_strings[0] not in common:
            assert action.help, f"{' '.join(command)}: {action.dest} has no help"


def test_version(capsys) -> None:  # type: ignore[no-untyped-def]
    import agent

    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"secrets-agent {agent.__version__}"
