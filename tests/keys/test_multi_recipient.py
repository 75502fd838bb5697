"""An envelope for several recipients (local keyring, SoftHSM2, KMS on moto) opens
with any one of them alone."""

from __future__ import annotations

import asyncio
import itertools
import uuid
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import boto3
import pytest

from agent.config import DataKeysConfig, parse_config
from agent.crypto.datakeys import DataKeys
from agent.crypto.envelope import (
    Envelope,
    EnvelopeContext,
    WrappedKey,
    dumps,
    open_envelope,
    parse,
    seal,
)
from agent.errors import DecryptionError, KeyRevoked, KeyUnavailable
from agent.keys import KeyProvider, create_provider
from agent.keys.local import LocalKeyring
from agent.metrics import Metrics
from tests.agentenv import AgentEnv

pytestmark = pytest.mark.integration
NAMES = ("local", "hsm", "kms")
PIN_VAR = "SA_TEST_HSM_PIN"
VALUE = b"three recipients, any one opens"


def _key_configs(dirpath: Path, token: Any, moto: Any) -> dict[str, dict[str, str]]:
    key_id = boto3.client(
        "kms", region_name="us-east-1", endpoint_url=moto.endpoint_url
    ).create_key()["KeyMetadata"]["KeyId"]
    return {
        "local": {"type": "local", "keyring": str(dirpath / "keyring.json")},
        "hsm": {
            "type": "pkcs11",
            "module": token.module,
            "token": token.token_label,
            "pin": f"env:{PIN_VAR}",
            "key": f"sa-{uuid.uuid4().hex[:8]}",
        },
        "kms": {
            "type": "aws-kms",
            "key_id": key_id,
            "region": "us-east-1",
            "endpoint_url": moto.endpoint_url,
        },
    }


class Broken:
    """A recipient that fails with ``error`` on every call (a region or an HSM down)."""

    def __init__(self, name: str, error: Exception) -> None:
        self.name = name
        self.error = error
        self.calls = 0

    async def wrap(self, dek: bytes, *, context: Mapping[str, str]) -> WrappedKey:
        raise self.error

    async def unwrap(self, wrapped: WrappedKey, *, context: Mapping[str, str]) -> bytearray:
        self.calls += 1
        raise self.error

    async def aclose(self) -> None:
        pass


def _errors(name: str) -> list[Exception]:
    return [
        KeyUnavailable(f"{name}: unreachable (test)"),
        KeyRevoked(f"{name}: disabled (test)", provider=name, key="k"),
        DecryptionError(f"{name}: refused (test)"),
    ]


@pytest.fixture
async def providers(
    tmp_path: Path, softhsm_token: Any, moto_server: Any, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[dict[str, KeyProvider]]:
    monkeypatch.setenv(PIN_VAR, softhsm_token.pin)
    LocalKeyring.create(tmp_path / "keyring.json")
    keys = _key_configs(tmp_path, softhsm_token, moto_server)
    config = parse_config({"keys": keys, "write_keys": list(NAMES)}, base_dir=tmp_path)
    built = {n: create_provider(n, config.keys[n], config=config, metrics=Metrics()) for n in NAMES}
    await built["hsm"].create_key()  # type: ignore[attr-defined]
    yield built
    for provider in built.values():
        await provider.aclose()


async def _sealed(providers: Mapping[str, KeyProvider]) -> Envelope:
    writer = DataKeys(providers, write_keys=NAMES, settings=DataKeysConfig(), metrics=Metrics())
    dek, wrapped = await writer.for_write("default")
    await writer.aclose()
    context = EnvelopeContext("multi/secret", "v1", "default")
    return parse(dumps(seal(VALUE, dek=dek, keys=wrapped, context=context)))


async def test_an_envelope_for_three_recipients_opens_with_any_one_alone(
    providers: dict[str, KeyProvider],
) -> None:
    envelope = await _sealed(providers)
    assert [(k.provider, k.key.startswith("arn:aws:kms:")) for k in envelope.keys] == [
        ("local", False),
        ("hsm", False),
        ("kms", True),
    ]
    for only in NAMES:
        metrics = Metrics()
        reader = DataKeys(
            {only: providers[only]}, write_keys=[only], settings=DataKeysConfig(), metrics=metrics
        )
        dek = await reader.unwrap(envelope.keys, store_id="default")
        assert open_envelope(envelope, dek=dek) == VALUE
        answered = metrics.registry.get_sample_value(
            "secrets_agent_key_unwrap_provider_total", {"provider": only}
        )
        assert answered == 1, only
        await reader.aclose()


async def test_the_working_recipient_answers_whatever_the_others_fail_with(
    providers: dict[str, KeyProvider],
) -> None:
    envelope = await _sealed(providers)
    for working in NAMES:
        others = [n for n in NAMES if n != working]
        for first, second in itertools.product(_errors(others[0]), _errors(others[1])):
            broken = {others[0]: Broken(others[0], first), others[1]: Broken(others[1], second)}
            configured: dict[str, KeyProvider] = {
                n: providers[n] if n == working else broken[n] for n in NAMES
            }
            metrics = Metrics()
            reader = DataKeys(
                configured, write_keys=[working], settings=DataKeysConfig(), metrics=metrics
            )
            dek = await reader.unwrap(envelope.keys, store_id="default")
            assert open_envelope(envelope, dek=dek) == VALUE
            answered = metrics.registry.get_sample_value(
                "secrets_agent_key_unwrap_provider_total", {"provider": working}
            )
            assert answered == 1
            # Only the recipients before the working one were asked.
            asked = [b.calls for n, b in broken.items()]
            assert asked == [1 if NAMES.index(n) < NAMES.index(working) else 0 for n in broken]
            await reader.aclose()


@pytest.mark.parametrize(
    ("kinds", "expected"),
    [
        ((0, 1, 2), KeyUnavailable),  # one transient failure: stale values may be served
        ((1, 1, 1), KeyRevoked),
        ((1, 2, 1), DecryptionError),
    ],
)
async def test_no_working_recipient_gives_the_most_hopeful_error(
    providers: dict[str, KeyProvider], kinds: tuple[int, int, int], expected: type[Exception]
) -> None:
    envelope = await _sealed(providers)
    broken: dict[str, KeyProvider] = {
        n: Broken(n, _errors(n)[k]) for n, k in zip(NAMES, kinds, strict=True)
    }
    reader = DataKeys(broken, write_keys=["local"], settings=DataKeysConfig(), metrics=Metrics())
    with pytest.raises(expected) as caught:
        await reader.unwrap(envelope.keys, store_id="default")
    assert type(caught.value) is expected
    assert all(f"{n}:" in str(caught.value) for n in NAMES)  # names every recipient and why


async def test_a_secret_written_for_three_providers_reads_through_the_cli_with_each_alone(
    env: AgentEnv, softhsm_token: Any, moto_server: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(PIN_VAR, softhsm_token.pin)
    keys = _key_configs(env.dir, softhsm_token, moto_server)
    env.configure(keys=keys, write_keys=list(NAMES))
    code, _, err = await asyncio.to_thread(env.cli, "keys", "create", "--provider", "hsm")
    assert code == 0, err
    await asyncio.to_thread(env.put, "multi/db", "s3cret")
    for only in NAMES:
        env.configure(keys={only: keys[only]}, write_keys=[only])
        code, out, err = await asyncio.to_thread(env.cli, "get", "multi/db")
        assert (code, out.strip()) == (0, "s3cret"), (only, err)
