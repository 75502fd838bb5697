"""``delete NAME`` with a recovery window, ``restore NAME``, and the purge by ``prune``."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from typing import Any

import pytest

from agent.core import Core
from agent.deletion import PURGED, SecretDeleted, delete
from agent.errors import BadRequest
from agent.rotation.schedule import Schedule
from agent.rotation.scheduler import check_due
from agent.types import CURRENT, PREVIOUS
from tests.agentenv import AgentEnv

pytestmark = pytest.mark.integration


def describe(env: AgentEnv, name: str) -> dict[str, Any]:
    code, out, err = env.cli("describe", name, "--json")
    assert code == 0, err
    return dict(json.loads(out))


def test_delete_hides_the_secret_refuses_writes_and_restore_puts_every_stage_back(
    env: AgentEnv,
) -> None:
    first = env.put("app/pw", "one")
    second = env.put("app/pw", "two")
    before = describe(env, "app/pw")["stages"]
    assert before == {CURRENT: second, PREVIOUS: first}

    code, out, err = env.cli("delete", "app/pw", "--recovery-window", "7d")
    assert code == 0 and "scheduled for deletion" in out, err
    code, out, err = env.cli("get", "app/pw")
    assert code == 1 and out == "" and "scheduled for deletion" in err
    doc = describe(env, "app/pw")
    assert doc["deletion"]["purged"] is False and doc["deletion"]["recoverable_until"]
    until = time.mktime(time.strptime(doc["deletion"]["recoverable_until"], "%Y-%m-%dT%H:%M:%SZ"))
    assert abs(until - time.timezone - (time.time() + 7 * 86400)) < 120
    code, out, _ = env.cli("list")
    assert "app/pw\t-\tscheduled for deletion until" in out
    # Writes are refused, with nothing written.
    versions = len(doc["versions"])
    code, _, err = env.cli("put", "app/pw", stdin=b"three")
    assert code == 1 and "restore" in err
    code, _, err = env.cli("promote", "app/pw", "CURRENT", first)
    assert code == 1 and "scheduled for deletion" in err
    code, _, err = env.cli("rotate", "app/pw", "--rotator", "random")
    assert code == 1 and "scheduled for deletion" in err
    assert len(describe(env, "app/pw")["versions"]) == versions
    code, _, err = env.cli("delete", "app/pw")
    assert code == 1 and "already" in err

    code, out, err = env.cli("restore", "app/pw")
    assert code == 0, err
    assert describe(env, "app/pw")["stages"] == before
    assert env.cli("get", "app/pw") == (0, "two", "")
    assert env.cli("get", "app/pw", "--stage", "PREVIOUS") == (0, "one", "")
    code, _, err = env.cli("restore", "app/pw")
    assert code == 2 and "not scheduled for deletion" in err
    events = [json.loads(line) for line in (env.dir / "audit.log").read_text().splitlines()]
    mine = [(e["event"], e["secret"]) for e in events if e["event"].startswith("secret_")]
    assert mine == [("secret_deleted", "app/pw"), ("secret_restored", "app/pw")]


def test_after_the_window_restore_is_refused_and_prune_purges_every_version(
    env: AgentEnv,
) -> None:
    env.put("app/old", "one")
    env.put("app/old", "two")
    env.put("app/keep", "kept")
    assert env.cli("delete", "app/old", "--recovery-window", "1s")[0] == 0
    code, out, _ = env.cli("prune", "--all", "--dry-run")
    assert "app/old: would purge" not in out  # the window is still open
    time.sleep(1.1)
    code, _, err = env.cli("restore", "app/old")
    assert code == 2 and "recovery window" in err and "ended" in err
    code, out, _ = env.cli("prune", "--all", "--dry-run")
    assert code == 0 and "app/old: would purge" in out
    assert len(describe(env, "app/old")["versions"]) == 2
    code, out, err = env.cli("prune", "--all")
    assert code == 0 and "app/old: purged, 2 version(s)" in out, err
    audit = (env.dir / "audit.log").read_text()
    assert '"event":"secret_purged"' in audit and "its recovery window had ended" in audit
    doc = describe(env, "app/old")
    assert doc["deletion"]["purged"] is True
    assert [v["stages"] for v in doc["versions"]] == [[PURGED]]  # only the tombstone
    assert env.cli("get", "app/keep") == (0, "kept", "")
    code, out, _ = env.cli("list")
    assert "app/old" not in out and "app/keep" in out
    code, _, err = env.cli("get", "app/old")
    assert code == 1 and "was deleted" in err
    code, _, err = env.cli("restore", "app/old")
    assert code == 1 and "nothing to restore" in err
    # The name can be used again: a new secret, with no PREVIOUS from before.
    new = env.put("app/old", "fresh")
    assert describe(env, "app/old")["stages"] == {CURRENT: new}
    assert env.cli("get", "app/old") == (0, "fresh", "")


def test_force_delete_without_recovery_purges_at_once(env: AgentEnv) -> None:
    env.put("app/now", "v")
    code, _, err = env.cli(
        "delete", "app/now", "--force-delete-without-recovery", "--recovery-window", "7d"
    )
    assert code == 2 and "exclude each other" in err
    code, out, err = env.cli("delete", "app/now", "--force-delete-without-recovery")
    assert code == 0 and "deleted for good, 1 version(s)" in out, err
    assert describe(env, "app/now")["deletion"]["purged"] is True
    assert env.cli("delete", "nothere/x")[0] == 1
    assert env.cli("delete", "app/now", "--recovery-window", "0s")[0] == 2


def test_the_store_holds_no_value_of_a_purged_secret(env: AgentEnv) -> None:
    env.put("app/gone", "very-secret-value-123")
    assert env.cli("delete", "app/gone", "--force-delete-without-recovery")[0] == 0
    blobs = b"".join(p.read_bytes() for p in (env.dir / "store").rglob("*") if p.is_file())
    assert b"very-secret-value-123" not in blobs  # (envelopes are ciphertext anyway)
    core = Core.build(env.config())

    async def tombstone() -> bytes:
        try:
            stages = (await core.store.read_stages("app/gone")).stages
            return (await core.resolver.fetch("app/gone", stages[PURGED])).value.reveal()
        finally:
            await core.aclose()

    assert b"very-secret" not in asyncio.run(tombstone())


async def test_a_running_agent_drops_a_deleted_secret_and_serves_it_again_after_restore(
    env: AgentEnv,
) -> None:
    """With the default grace (5 min) for a secret merely missing from the store: a proven
    deletion is dropped at once, through the watch."""
    env.put("app/live", "served")
    async with env.running() as agent:
        await agent.eventually("app/live", b"served")
        code, _, err = await asyncio.to_thread(env.cli, "delete", "app/live")
        assert code == 0, err
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 15
        status, body = 200, b""
        while loop.time() < deadline:
            status, _, body = await agent.get("/v1/secrets/app/live")
            if status == 404:
                break
            await asyncio.sleep(0.05)
        assert status == 404 and b"scheduled for deletion" in body, body
        _, _, listing = await agent.get("/v1/secrets")
        assert b"app/live" not in listing
        code, _, err = await asyncio.to_thread(env.cli, "restore", "app/live")
        assert code == 0, err
        await agent.eventually("app/live", b"served", timeout=15)


async def test_a_scheduled_rotation_leaves_a_deleted_secret_alone(env: AgentEnv) -> None:
    env.put("app/r", "v")
    core = Core.build(env.config())
    try:
        writer = core.writer()
        schedule = Schedule(every=1)
        assert (await check_due(core.store, "app/r", schedule, now=time.time() + 5)).run
        await delete(writer, "app/r", window=3600)
        due = await check_due(core.store, "app/r", schedule, now=time.time() + 5)
        assert not due.run and due.reason == "the secret is deleted"
        with pytest.raises(SecretDeleted):
            await writer.put("app/r", b"w")
        with pytest.raises(BadRequest):
            await writer.put("app/s", b"w", stage="DELETED.CURRENT")
    finally:
        await core.aclose()


def test_with_the_audit_log_on_stdout_the_cli_writes_its_records_to_stderr(
    env: AgentEnv,
) -> None:
    """``audit.path: "-"`` (init's default, for read-only mounts) is the agent's
    stdout. A command that audits (delete, restore, rotate, keys) keeps its
    stdout for its answer, which scripts read, and writes the records to stderr."""
    env.configure(audit={"path": "-"})
    env.put("app/pw", "one")
    for args in (("delete", "app/pw"), ("restore", "app/pw")):
        proc = subprocess.run(
            [sys.executable, "-m", "agent", "-c", str(env.config_path), *args],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.startswith("app/pw: ") and "{" not in proc.stdout, proc.stdout
        records = [json.loads(line) for line in proc.stderr.splitlines() if line.startswith("{")]
        assert [r["event"] for r in records] == [f"secret_{args[0]}d"], proc.stderr
