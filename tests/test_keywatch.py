"""A value whose master key was revoked stops being served after datakeys.max_age."""

from __future__ import annotations

from typing import Any

import pytest

from agent.cache import SecretCache
from agent.config import DataKeysConfig, RefreshConfig
from agent.crypto.datakeys import DataKeys
from agent.errors import KeyRevoked
from agent.keys.base import KeyInfo
from agent.keywatch import KeyWatch
from agent.metrics import Metrics
from agent.resolver import Resolver
from agent.writer import SecretWriter
from tests.fakes import FakeKeyProvider, MemoryStore


class ManagedFake(FakeKeyProvider):
    """A fake provider whose key state ``keys list`` reports (enabled or disabled)."""

    state = "enabled"

    async def list_keys(self) -> list[KeyInfo]:
        return [KeyInfo(self.name, self.key, state=self.state, primary=True)]

    async def create_key(self) -> KeyInfo:
        return (await self.list_keys())[0]

    async def rotate_key(self) -> KeyInfo:
        return (await self.list_keys())[0]


class Clock:
    now = 100.0

    def __call__(self) -> float:
        return self.now


async def test_revoked_key_values_served_until_max_age_then_refused() -> None:
    clock, metrics = Clock(), Metrics()
    provider = ManagedFake("local")
    store = MemoryStore()
    datakeys = DataKeys(
        {"local": provider},
        write_keys=["local"],
        settings=DataKeysConfig(max_age=300),
        metrics=metrics,
        clock=clock,
    )
    await SecretWriter(store, datakeys).put("db", b"value")
    cache = SecretCache(
        Resolver(store, datakeys, metrics=metrics),
        settings=RefreshConfig(),
        metrics=metrics,
        clock=clock,
    )
    watch = KeyWatch({"local": provider}, datakeys, metrics=metrics)
    assert (await cache.get("db")).secret.value.reveal() == b"value"

    provider.state = "disabled"
    await watch.check_once()
    assert metrics.registry.get_sample_value("secrets_agent_keys_revoked") == 1
    clock.now += 299
    assert (await cache.get("db")).secret.value.reveal() == b"value"  # within max_age
    clock.now += 2
    with pytest.raises(KeyRevoked, match=r"secret 'db' is no longer served.*local/master") as e:
        await cache.get("db")
    assert "value" not in e.value.message.replace("'db'", "")
    assert (
        metrics.registry.get_sample_value(
            "secrets_agent_cache_requests_total", {"result": "revoked"}
        )
        == 1
    )

    provider.state = "enabled"  # re-enabled: served again at once
    await watch.check_once()
    assert (await cache.get("db")).secret.value.reveal() == b"value"


@pytest.mark.integration
async def test_a_deleted_hsm_key_stops_an_agent_serving_after_max_age(
    env: Any, softhsm_token: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    import asyncio
    import json
    import uuid

    import pkcs11
    from pkcs11 import Attribute, ObjectClass

    label = f"sa-{uuid.uuid4().hex[:8]}"
    monkeypatch.setenv("SA_TEST_HSM_PIN", softhsm_token.pin)
    env.configure(
        keys={
            "hsm": {
                "type": "pkcs11",
                "module": softhsm_token.module,
                "token": softhsm_token.token_label,
                "pin": "env:SA_TEST_HSM_PIN",
                "key": label,
            }
        },
        write_keys=["hsm"],
        datakeys={"max_age": "1s"},
    )
    assert (await asyncio.to_thread(env.cli, "keys", "create", "--provider", "hsm"))[0] == 0
    env.put("db", "value")
    async with env.running() as agent:
        assert await agent.value("db") == b"value"
        lib = pkcs11.lib(softhsm_token.module)
        with lib.get_token(token_label=softhsm_token.token_label).open(rw=True) as session:
            for key in session.get_objects(
                {Attribute.CLASS: ObjectClass.SECRET_KEY, Attribute.LABEL: label}
            ):
                key.destroy()
        status = 200
        body = b""
        for _ in range(200):  # key check every 0.5 s, then max_age 1 s
            status, _, body = await agent.get("/v1/secrets/db")
            if status != 200:
                break
            await asyncio.sleep(0.05)
        assert status == 502
        assert json.loads(body)["error"]["code"] == "key_revoked"
        assert b"value" not in body
