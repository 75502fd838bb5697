"""Re-encryption from the local keyring to a SoftHSM2 token, interrupted and resumed,
while an agent keeps serving."""

from __future__ import annotations

import asyncio
import json
import uuid
from pathlib import Path
from typing import Any

import pytest

from agent.config import load_config
from agent.core import Core
from agent.crypto.envelope import parse
from agent.errors import BackendUnavailable
from agent.reencrypt import Reencryptor, target_recipients
from tests.agentenv import AgentEnv

pytestmark = pytest.mark.integration
COUNT = 200


def _with_hsm(env: AgentEnv, token: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SA_TEST_HSM_PIN", token.pin)
    env.configure(
        keys={
            "local": {"type": "local", "keyring": "./keyring.json"},
            "hsm": {
                "type": "pkcs11",
                "module": token.module,
                "token": token.token_label,
                "pin": "env:SA_TEST_HSM_PIN",
                "key": f"sa-{uuid.uuid4().hex[:8]}",
            },
        },
        write_keys=["local"],
        refresh={"interval": "1s"},
    )


def _recipients(env: AgentEnv) -> set[tuple[str, ...]]:
    out = set()
    for path in (env.dir / "store" / "secrets").rglob("versions/*.json"):
        out.add(tuple(k.provider for k in parse(path.read_bytes()).keys))
    return out


async def test_reencrypt_local_to_hsm_interrupted_resumed_while_serving(
    env: AgentEnv, softhsm_token: Any, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    _with_hsm(env, softhsm_token, monkeypatch)
    code, out, err = await asyncio.to_thread(env.cli, "keys", "create", "--provider", "hsm")
    assert code == 0, err
    values = {f"re/s{i:03d}": f"value-{i}" for i in range(COUNT)}
    (tmp_path / "bulk.json").write_text(json.dumps(values))
    assert (await asyncio.to_thread(env.cli, "import", str(tmp_path / "bulk.json")))[0] == 0
    assert _recipients(env) == {("local",)}
    async with env.running() as agent:
        core = Core.build(load_config(env.config_path))
        targets = target_recipients(core, add=["hsm"], remove=["local"])
        reencryptor = Reencryptor(core, targets)
        calls = 0
        original = core.store.replace_envelope

        async def failing_half_way(*args: Any, **kw: Any) -> None:
            nonlocal calls
            calls += 1
            if calls > COUNT // 2:
                raise BackendUnavailable("interrupted (test)")
            await original(*args, **kw)

        core.store.replace_envelope = failing_half_way  # type: ignore[method-assign]
        with pytest.raises(BackendUnavailable):
            await reencryptor.run(None)
        await core.aclose()
        assert _recipients(env) == {("local",), ("hsm",)}  # half done
        for name in list(values)[::17]:  # still serving, whatever each envelope holds
            assert await agent.value(name) == values[name].encode()
        code, out, err = await asyncio.to_thread(
            env.cli,
            "reencrypt",
            "--store-wide",
            "--add-recipient",
            "hsm",
            "--remove-recipient",
            "local",
        )
        assert code == 0, err
        assert f"{COUNT} versions: {COUNT - COUNT // 2} rewrapped, {COUNT // 2} already" in out
        assert _recipients(env) == {("hsm",)}
        # A cold agent that only has the HSM reads everything: the payloads were untouched.
        agent.daemon.cache.remove("re/s007")
        agent.daemon.core.datakeys.drop("local")
        for name in list(values)[::13]:
            assert await agent.value(name) == values[name].encode()
    code, out, _ = await asyncio.to_thread(
        env.cli,
        "reencrypt",
        "--store-wide",
        "--add-recipient",
        "hsm",
        "--remove-recipient",
        "local",
    )
    assert f"0 rewrapped, {COUNT} already current" in out  # idempotent


async def test_reencrypt_after_local_key_rotation_rewraps_old_versions(env: AgentEnv) -> None:
    env.put("k", "v1")
    assert (await asyncio.to_thread(env.cli, "keys", "rotate"))[0] == 0
    code, out, err = await asyncio.to_thread(env.cli, "reencrypt", "k")
    assert code == 0, err
    assert "1 rewrapped" in out and "local: 1" in out
    assert (await asyncio.to_thread(env.cli, "get", "k"))[1] == "v1"
    code, out, _ = await asyncio.to_thread(env.cli, "reencrypt", "--store-wide")
    assert "0 rewrapped, 1 already current" in out


def test_reencrypt_needs_names_or_store_wide(env: AgentEnv) -> None:
    code, _, err = env.cli("reencrypt")
    assert code == 2 and "--store-wide" in err
