"""Master keys rotate on a schedule (keys.<name>.rotate_every); old versions keep decrypting."""

from __future__ import annotations

import asyncio
import json
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import yaml

from agent.audit import NullAudit
from agent.config import DataKeysConfig, parse_config
from agent.crypto.datakeys import DataKeys
from agent.crypto.envelope import parse
from agent.errors import ConfigError
from agent.keyrotation import KeyRotation
from agent.keys.local import LocalKeyProvider, LocalKeyring
from agent.metrics import Metrics
from agent.resolver import Resolver
from agent.writer import SecretWriter
from tests.agentenv import AgentEnv
from tests.fakes import MemoryStore


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def _versions(path: Path) -> list[int]:
    doc = json.loads(path.read_text())
    return sorted(int(v) for key in doc["keys"].values() for v in key["versions"])


def _wrap_version(envelope: bytes) -> int:
    (wrapped,) = parse(envelope).keys
    return int.from_bytes(wrapped.wrapped[1:5], "big")


async def test_a_due_key_rotates_and_new_envelopes_use_the_new_version_at_once(
    tmp_path: Path,
) -> None:
    path = tmp_path / "keyring.json"
    LocalKeyring.create(path)
    metrics = Metrics()
    provider = LocalKeyProvider("local", keyring=path, metrics=metrics)
    store = MemoryStore()
    datakeys = DataKeys(
        {"local": provider},
        write_keys=["local"],
        settings=DataKeysConfig(max_messages=1000),
        metrics=metrics,
    )
    writer = SecretWriter(store, datakeys)
    old = await writer.put("db", b"before")
    (created,) = [i for i in await provider.list_keys() if i.primary]
    born = datetime.fromisoformat(created.created_at.replace("Z", "+00:00")).timestamp()
    clock = Clock(born + 10)
    rotation = KeyRotation(
        {"local": provider},
        {"local": 3600.0},
        datakeys,
        metrics=metrics,
        audit=NullAudit(),
        clock=clock,
    )

    await rotation.check_once()  # not due: nothing happens
    assert _versions(path) == [1]
    assert rotation.next_due["local"] == pytest.approx(born + 3600)

    clock.now = born + 3601
    await rotation.check_once()
    assert _versions(path) == [1, 2]
    new = await writer.put("db", b"after")  # the write-side DEK was retired at once
    assert _wrap_version((await store.read_version("db", new.version_id)).envelope) == 2
    assert _wrap_version((await store.read_version("db", old.version_id)).envelope) == 1
    sample = metrics.registry.get_sample_value
    assert sample("secrets_agent_key_rotations_total", {"provider": "local", "outcome": "ok"}) == 1

    # the old version keeps decrypting, with a fresh provider and no cached data keys
    fresh = DataKeys(
        {"local": LocalKeyProvider("local", keyring=path, metrics=Metrics())},
        write_keys=["local"],
        settings=DataKeysConfig(),
        metrics=Metrics(),
    )
    resolver = Resolver(store, fresh, metrics=Metrics())
    got = await resolver.fetch("db", old.version_id)
    assert got.value.reveal() == b"before"

    (second,) = [i for i in await provider.list_keys() if i.primary]
    clock.now = datetime.fromisoformat(second.created_at.replace("Z", "+00:00")).timestamp() + 10
    await rotation.check_once()  # version 2 is young: no second rotation
    assert _versions(path) == [1, 2]


async def test_a_failing_rotation_is_counted_and_reported_without_stopping(tmp_path: Path) -> None:
    path = tmp_path / "keyring.json"
    LocalKeyring.create(path)
    metrics = Metrics()
    provider = LocalKeyProvider("local", keyring=path, metrics=metrics)
    datakeys = DataKeys(
        {"local": provider}, write_keys=["local"], settings=DataKeysConfig(), metrics=metrics
    )
    rotation = KeyRotation(
        {"local": provider},
        {"local": 1.0},
        datakeys,
        metrics=metrics,
        audit=NullAudit(),
        clock=Clock(4_000_000_000.0),
    )
    path.write_text("{ not a keyring")
    await rotation.check_once()
    status: Any = rotation.status()["key_rotation"]
    assert status[0]["last_error"]
    sample = metrics.registry.get_sample_value
    assert (
        sample("secrets_agent_key_rotations_total", {"provider": "local", "outcome": "error"}) == 1
    )


@pytest.mark.parametrize(
    ("provider", "every", "message"),
    [
        ({"type": "local"}, "500ms", "rotate_every"),
        ({"type": "aws-kms", "key_id": "alias/x"}, "30d", "whole days from 90d to 2560d"),
        ({"type": "aws-kms", "key_id": "alias/x"}, "100d12h", "rotate_every"),
    ],
)
def test_bad_schedules_are_config_errors_naming_the_field(
    provider: dict[str, Any], every: str, message: str
) -> None:
    with pytest.raises(ConfigError, match=message) as err:
        parse_config({"keys": {"k": {**provider, "rotate_every": every}}, "write_keys": ["k"]})
    assert "keys.k" in str(err.value)


async def test_the_running_agent_rotates_its_keyring_and_keeps_serving(env: AgentEnv) -> None:
    env.put("app/token", "v1-value")
    doc_path = env.dir / "agent.yaml"
    doc = yaml.safe_load(doc_path.read_text())
    doc["keys"]["local"]["rotate_every"] = "1s"
    doc_path.write_text(yaml.safe_dump(doc))
    keyring = env.dir / "keyring.json"
    async with env.running() as agent:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 20
        while loop.time() < deadline and len(_versions(keyring)) < 2:
            await asyncio.sleep(0.1)
        assert len(_versions(keyring)) >= 2, "the agent did not rotate its keyring"
        assert await agent.value("app/token") == b"v1-value"
        env.put("app/token", "v2-value")  # a writer picks up the new primary version
        await agent.eventually("app/token", b"v2-value")
        status, _, body = await agent.get("/v1/status")
        assert status == 200
        assert json.loads(body)["key_rotation"][0]["provider"] == "local"
