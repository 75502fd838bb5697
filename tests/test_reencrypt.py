"""Re-encryption: rewrap data keys under the current master keys, never touching
payloads, resumable, while an agent keeps serving (local keyring and SoftHSM2)."""

from __future__ import annotations

import asyncio
import base64
import json
import uuid
from pathlib import Path
from typing import Any

import pytest

from agent.config import load_config
from agent.core import Core
from agent.crypto.envelope import parse
from agent.reencrypt import Reencryptor, target_recipients
from tests.agentenv import AgentEnv, RunningAgent

COUNT = 300
MOVE = ("reencrypt", "--store-wide", "--add-recipient", "hsm", "--remove-recipient", "local")
PIN_VAR = "SA_TEST_HSM_PIN"


def _with_hsm(env: AgentEnv, token: Any, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """Configure providers local (writing) and hsm, create the HSM key; the hsm config."""
    monkeypatch.setenv(PIN_VAR, token.pin)
    hsm = {
        "type": "pkcs11",
        "module": token.module,
        "token": token.token_label,
        "pin": f"env:{PIN_VAR}",
        "key": f"sa-{uuid.uuid4().hex[:8]}",
    }
    local = {"type": "local", "keyring": "./keyring.json"}
    env.configure(keys={"local": local, "hsm": hsm}, write_keys=["local"])
    code, _, err = env.cli("keys", "create", "--provider", "hsm")
    assert code == 0, err
    return hsm


def _versions(env: AgentEnv) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in sorted((env.dir / "store").rglob("versions/*.json"))}


def _payload(doc: bytes) -> dict[str, Any]:
    """An envelope without its recipients: what re-encryption must never change."""
    fields = json.loads(doc)
    del fields["keys"]
    return dict(fields)


def _recipients(env: AgentEnv) -> dict[tuple[str, ...], int]:
    out: dict[tuple[str, ...], int] = {}
    for doc in _versions(env).values():
        key = tuple(k.provider for k in parse(doc).keys)
        out[key] = out.get(key, 0) + 1
    return out


def _stages(env: AgentEnv) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in (env.dir / "store").rglob("stages.json")}


async def _serve_all_the_time(
    agent: RunningAgent, values: dict[str, str], stop: asyncio.Event
) -> int:
    """Read every secret over and over, each time cold (so from the store, whichever
    recipients its envelope has by then); return how many reads succeeded."""
    reads = 0
    while not stop.is_set():
        for name, value in values.items():
            agent.daemon.cache.remove(name)
            assert await agent.value(name) == value.encode(), name
            reads += 1
    return reads


@pytest.mark.integration
async def test_reencrypt_local_to_hsm_interrupted_and_resumed_while_an_agent_serves(
    env: AgentEnv, softhsm_token: Any, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    hsm = await asyncio.to_thread(_with_hsm, env, softhsm_token, monkeypatch)
    values = {f"re/s{i:03d}": f"value-{i}" for i in range(COUNT)}
    (tmp_path / "bulk.json").write_text(json.dumps(values))
    assert (await asyncio.to_thread(env.cli, "import", str(tmp_path / "bulk.json")))[0] == 0
    for name in list(values)[:5]:  # a few secrets with a PREVIOUS version too
        values[name] += "-b"
        await asyncio.to_thread(env.put, name, values[name])
    total = COUNT + 5
    before, stages = _versions(env), _stages(env)
    assert _recipients(env) == {("local",): total}
    async with env.running() as agent:
        stop = asyncio.Event()
        reader = asyncio.create_task(_serve_all_the_time(agent, values, stop))
        core = Core.build(load_config(env.config_path))
        reencryptor = Reencryptor(core, target_recipients(core, add=["hsm"], remove=["local"]))
        half, done = total // 2, asyncio.Event()
        replace = core.store.replace_envelope

        async def stall_half_way(*args: Any, **kw: Any) -> None:
            if reencryptor.report.rewrapped == half:
                done.set()
                await asyncio.Event().wait()  # until cancelled
            await replace(*args, **kw)

        core.store.replace_envelope = stall_half_way  # type: ignore[method-assign]
        task = asyncio.create_task(reencryptor.run(None))
        await asyncio.wait_for(done.wait(), 60)
        task.cancel()  # like ^C
        with pytest.raises(asyncio.CancelledError):
            await task
        await core.aclose()
        assert _recipients(env) == {("hsm",): half, ("local",): total - half}
        code, out, err = await asyncio.to_thread(env.cli, *MOVE)
        assert code == 0, err
        assert f"{total} versions: {total - half} rewrapped, {half} already current" in out
        stop.set()
        reads = await asyncio.wait_for(reader, 60)
    assert reads >= COUNT  # at least one full pass, cold, while the envelopes changed
    after = _versions(env)
    assert list(after) == list(before)  # same version ids
    assert all(_payload(after[p]) == _payload(before[p]) for p in before)  # payloads untouched
    assert _stages(env) == stages
    assert _recipients(env) == {("hsm",): total}
    code, out, _ = await asyncio.to_thread(env.cli, *MOVE)  # idempotent
    assert code == 0 and f"0 rewrapped, {total} already current" in out
    env.configure(keys={"hsm": hsm}, write_keys=["hsm"])  # no keyring configured at all
    for name in list(values)[::29]:
        assert (await asyncio.to_thread(env.cli, "get", name))[1].strip() == values[name]


@pytest.mark.integration
async def test_reencrypt_after_hsm_rotation_moves_to_the_new_key_version(
    env: AgentEnv, softhsm_token: Any, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    await asyncio.to_thread(_with_hsm, env, softhsm_token, monkeypatch)
    env.configure(write_keys=["hsm"])
    (tmp_path / "bulk.json").write_text(json.dumps({f"rot/s{i}": f"v{i}" for i in range(20)}))
    assert (await asyncio.to_thread(env.cli, "import", str(tmp_path / "bulk.json")))[0] == 0
    assert (await asyncio.to_thread(env.cli, "keys", "rotate", "--provider", "hsm"))[0] == 0
    code, out, err = await asyncio.to_thread(env.cli, "reencrypt", "--store-wide")
    assert code == 0, err
    assert "20 rewrapped" in out and "hsm: 1" in out  # one data key, one wrap
    versions = {parse(doc).keys[0].wrapped[1:5] for doc in _versions(env).values()}
    assert versions == {(2).to_bytes(4, "big")}
    assert (await asyncio.to_thread(env.cli, "get", "rot/s7"))[1].strip() == "v7"


@pytest.mark.integration
async def test_adding_a_recipient_keeps_the_current_ones_byte_for_byte(
    env: AgentEnv, softhsm_token: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    await asyncio.to_thread(_with_hsm, env, softhsm_token, monkeypatch)
    await asyncio.to_thread(env.put, "add/one", "v1")
    (before,) = _versions(env).values()
    code, out, err = await asyncio.to_thread(
        env.cli, "reencrypt", "--add-recipient", "hsm", "add/one"
    )
    assert code == 0, err
    assert "wraps hsm: 1;" in out and "recipients now: local, hsm" in out
    (after,) = _versions(env).values()
    assert [k.provider for k in parse(after).keys] == ["local", "hsm"]
    assert parse(after).keys[0] == parse(before).keys[0]


@pytest.mark.integration
async def test_an_unreadable_version_is_reported_and_the_others_still_move(
    env: AgentEnv, softhsm_token: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    await asyncio.to_thread(_with_hsm, env, softhsm_token, monkeypatch)
    for i in range(5):
        await asyncio.to_thread(env.put, f"bad/s{i}", f"v{i}")
    path = next(p for p in _versions(env) if "bad/s3" in str(p))
    doc = json.loads(path.read_bytes())
    wrapped = bytearray(base64.b64decode(doc["keys"][0]["wrapped"]))
    wrapped[-1] ^= 0x01  # a corrupt wrapped key
    doc["keys"][0]["wrapped"] = base64.b64encode(wrapped).decode()
    path.write_text(json.dumps(doc))
    code, out, err = await asyncio.to_thread(env.cli, *MOVE)
    assert code == 1
    assert "4 rewrapped" in out and "1 failed" in out
    assert "bad/s3" in err and "v3" not in err
    assert _recipients(env) == {("hsm",): 4, ("local",): 1}


async def test_a_concurrent_change_is_a_conflict_never_an_overwrite(env: AgentEnv) -> None:
    await asyncio.to_thread(env.put, "cas/one", "v1")
    assert (await asyncio.to_thread(env.cli, "keys", "rotate"))[0] == 0
    core = Core.build(load_config(env.config_path))
    ((path, original),) = _versions(env).items()
    theirs = json.loads(original)
    theirs["keys"].append(dict(theirs["keys"][0], key="theirs"))
    replace = core.store.replace_envelope

    async def someone_else_first(*args: Any, **kw: Any) -> None:
        path.write_text(json.dumps(theirs))
        await replace(*args, **kw)

    core.store.replace_envelope = someone_else_first  # type: ignore[method-assign]
    report = await Reencryptor(core, ["local"]).run(["cas/one"])
    await core.aclose()
    assert (report.conflicts, report.rewrapped, report.complete) == (1, 0, False)
    assert json.loads(path.read_bytes()) == theirs


async def test_reencrypt_after_local_key_rotation_rewraps_old_versions(env: AgentEnv) -> None:
    await asyncio.to_thread(env.put, "k", "v1")
    assert (await asyncio.to_thread(env.cli, "keys", "rotate"))[0] == 0
    code, out, err = await asyncio.to_thread(env.cli, "reencrypt", "k")
    assert code == 0, err
    assert "1 rewrapped" in out and "local: 1" in out
    assert (await asyncio.to_thread(env.cli, "get", "k"))[1] == "v1"
    code, out, _ = await asyncio.to_thread(env.cli, "reencrypt", "--store-wide")
    assert "0 rewrapped, 1 already current" in out


@pytest.mark.parametrize("argv", [(), ("k", "--store-wide")])
def test_reencrypt_needs_names_or_store_wide_but_not_both(
    env: AgentEnv, argv: tuple[str, ...]
) -> None:
    code, _, err = env.cli("reencrypt", *argv)
    assert code == 2 and "--store-wide" in err


def test_unknown_recipients_are_refused_before_anything_changes(env: AgentEnv) -> None:
    env.put("k", "v1")
    before = _versions(env)
    code, _, err = env.cli("reencrypt", "--store-wide", "--add-recipient", "nope")
    assert code != 0 and "no key provider 'nope'" in err
    code, _, err = env.cli("reencrypt", "--store-wide", "--remove-recipient", "local")
    assert code != 0 and "no recipient" in err
    assert _versions(env) == before
