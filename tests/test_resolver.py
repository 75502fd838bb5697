"""The resolver with a real local keyring: every tampered envelope is refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.config import DataKeysConfig
from agent.crypto.datakeys import DataKeys
from agent.errors import DecryptionError
from agent.keys.local import LocalKeyProvider, LocalKeyring
from agent.metrics import Metrics
from agent.resolver import Resolver
from agent.types import utcnow
from agent.writer import SecretWriter
from tests.fakes import MemoryStore


@pytest.fixture(scope="module")
def sealed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Resolver, bytes]:
    """A resolver over a real keyring, and one envelope sealed for ``prod/db`` / ``v1``."""
    import asyncio

    keyring = tmp_path_factory.mktemp("keys") / "keyring.json"
    LocalKeyring.create(keyring)
    metrics = Metrics()
    provider = LocalKeyProvider("local", keyring=keyring, metrics=metrics)
    store = MemoryStore()

    def datakeys() -> DataKeys:
        return DataKeys(
            {"local": provider}, write_keys=["local"], settings=DataKeysConfig(), metrics=metrics
        )

    envelope = asyncio.run(
        SecretWriter(store, datakeys()).seal(
            "prod/db", "v1", b'{"password": "tamper-target"}', "string"
        )
    )
    return Resolver(store, datakeys(), metrics=metrics), envelope


async def test_the_untampered_envelope_opens(sealed: tuple[Resolver, bytes]) -> None:
    resolver, envelope = sealed
    secret = await resolver.open("prod/db", "v1", envelope, utcnow())
    assert secret.value.json_key("password") == "tamper-target"


@settings(
    max_examples=400,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data())
async def test_any_flipped_bit_is_refused_end_to_end(
    sealed: tuple[Resolver, bytes], data: st.DataObject
) -> None:
    """Including bits in the recipients, which sit outside the AAD: the local
    provider's AES-GCM wrap (with the key version and context as AAD) refuses them."""
    resolver, envelope = sealed
    bit = data.draw(st.integers(0, len(envelope) * 8 - 1))
    tampered = bytearray(envelope)
    tampered[bit // 8] ^= 1 << (bit % 8)
    with pytest.raises(DecryptionError) as info:
        await resolver.open("prod/db", "v1", bytes(tampered), utcnow())
    assert "tamper-target" not in str(info.value)


async def test_envelope_at_another_place_is_refused_naming_both(
    sealed: tuple[Resolver, bytes],
) -> None:
    resolver, envelope = sealed
    with pytest.raises(
        DecryptionError,
        match=r"written for secret 'prod/db' version 'v1'.*"
        r"found at secret 'prod/other'",
    ):
        await resolver.open("prod/other", "v1", envelope, utcnow())


async def test_a_recipient_swapped_for_another_keyrings_wrap_is_refused(
    sealed: tuple[Resolver, bytes], tmp_path: Path
) -> None:
    resolver, envelope = sealed
    other = tmp_path / "other.json"
    LocalKeyring.create(other)
    stranger = LocalKeyProvider("local", keyring=other)
    doc = json.loads(envelope)
    wrapped = await stranger.wrap(
        b"\x00" * 32, context={"purpose": "secrets-agent", "store": "default"}
    )
    import base64

    doc["keys"][0]["wrapped"] = base64.b64encode(wrapped.wrapped).decode()
    with pytest.raises(DecryptionError):
        await resolver.open("prod/db", "v1", json.dumps(doc).encode(), utcnow())
