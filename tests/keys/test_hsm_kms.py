"""KMS (moto's standalone server over HTTP) and PKCS#11 (a real SoftHSM2 token)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import boto3
import pytest

from agent.config import DataKeysConfig
from agent.crypto.datakeys import DataKeys
from agent.crypto.envelope import WrappedKey, wrap_context
from agent.errors import DecryptionError, KeyRevoked, KeyUnavailable
from agent.keys.aws_kms import KmsKeyProvider
from agent.keys.base import KeyProvider
from agent.keys.local import LocalKeyProvider, LocalKeyring
from agent.keys.pkcs11 import Pkcs11KeyProvider
from agent.metrics import Metrics

pytestmark = pytest.mark.integration
CTX = wrap_context("default")
DEK = bytes(range(32))


def _kms(server: Any) -> Any:
    return boto3.client("kms", region_name="us-east-1", endpoint_url=server.endpoint_url)


@pytest.fixture
async def kms(moto_server: Any) -> AsyncIterator[KmsKeyProvider]:
    client = _kms(moto_server)
    key_id = client.create_key(Description="secrets-agent test")["KeyMetadata"]["KeyId"]
    alias = f"alias/sa-{uuid.uuid4().hex[:8]}"
    client.create_alias(AliasName=alias, TargetKeyId=key_id)
    provider = KmsKeyProvider(
        "kms", key_id=alias, region="us-east-1", endpoint_url=moto_server.endpoint_url
    )
    yield provider
    await provider.aclose()


@pytest.fixture
async def hsm(softhsm_token: Any) -> AsyncIterator[Pkcs11KeyProvider]:
    provider = Pkcs11KeyProvider(
        "hsm",
        module=Path(softhsm_token.module),
        token=softhsm_token.token_label,
        pin=softhsm_token.pin.encode(),
        key=f"sa-{uuid.uuid4().hex[:8]}",
    )
    await provider.create_key()
    yield provider
    await provider.aclose()


def _flip(wrapped: WrappedKey, index: int) -> WrappedKey:
    blob = bytearray(wrapped.wrapped)
    blob[index] ^= 0x01
    return WrappedKey(wrapped.provider, wrapped.key, bytes(blob))


async def test_kms_round_trip_records_the_key_arn_not_the_alias(kms: KmsKeyProvider) -> None:
    wrapped = await kms.wrap(DEK, context=CTX)
    assert wrapped.key.startswith("arn:aws:kms:") and "alias" not in wrapped.key
    assert await kms.unwrap(wrapped, context=CTX) == bytearray(DEK)


async def test_kms_refuses_tampered_blobs_and_wrong_contexts(kms: KmsKeyProvider) -> None:
    wrapped = await kms.wrap(DEK, context=CTX)
    for index in (1, 5, len(wrapped.wrapped) - 1):  # context digest, then KMS ciphertext
        with pytest.raises((DecryptionError, KeyUnavailable)):
            await kms.unwrap(_flip(wrapped, index), context=CTX)
    with pytest.raises(DecryptionError, match="another context"):
        await kms.unwrap(wrapped, context=wrap_context("other-store"))


async def test_kms_denied_key_is_revocation_and_drops_cached_data_keys(
    kms: KmsKeyProvider, moto_server: Any
) -> None:
    """KMS answering AccessDenied (here: the blob names a key we may not use) is a
    revocation: the provider says KeyRevoked and the data-key cache drops that key.

    moto does not refuse Decrypt on a disabled key (real KMS does, with
    DisabledException, mapped the same way), so DisableKey is checked through
    ``keys list`` only.
    """
    metrics = Metrics()
    keys = DataKeys({"kms": kms}, write_keys=["kms"], settings=DataKeysConfig(), metrics=metrics)
    _, wrapped = await keys.for_write("default")
    other = _kms(moto_server).create_key()["KeyMetadata"]["Arn"]
    stolen = WrappedKey("kms", other, wrapped[0].wrapped)
    with pytest.raises(KeyRevoked):
        await kms.unwrap(stolen, context=CTX)
    with pytest.raises(DecryptionError):
        await keys.unwrap([stolen], store_id="default")
    _kms(moto_server).disable_key(KeyId=(await kms.arn()).rsplit("/", 1)[1])
    assert (await kms.list_keys())[0].state == "disabled"


async def test_hsm_round_trip_with_a_non_extractable_key(
    hsm: Pkcs11KeyProvider, softhsm_token: Any
) -> None:
    import pkcs11
    from pkcs11 import Attribute, ObjectClass

    wrapped = await hsm.wrap(DEK, context=CTX)
    assert await hsm.unwrap(wrapped, context=CTX) == bytearray(DEK)
    lib = pkcs11.lib(softhsm_token.module)
    # The provider's session already logged this process in (login is per process).
    with lib.get_token(token_label=softhsm_token.token_label).open() as session:
        (key,) = session.get_objects(
            {Attribute.CLASS: ObjectClass.SECRET_KEY, Attribute.LABEL: hsm.key_label}
        )
        assert key[Attribute.SENSITIVE] and not key[Attribute.EXTRACTABLE]


async def test_hsm_refuses_tampered_blobs_and_wrong_contexts(hsm: Pkcs11KeyProvider) -> None:
    wrapped = await hsm.wrap(DEK, context=CTX)
    for index in range(5, len(wrapped.wrapped)):  # IV, ciphertext and tag
        with pytest.raises(DecryptionError):
            await hsm.unwrap(_flip(wrapped, index), context=CTX)
    with pytest.raises(DecryptionError):
        await hsm.unwrap(wrapped, context=wrap_context("other-store"))


async def test_hsm_rotation_keeps_old_blobs_opening(hsm: Pkcs11KeyProvider) -> None:
    old = await hsm.wrap(DEK, context=CTX)
    info = await hsm.rotate_key()
    assert info.version == "2"
    new = await hsm.wrap(DEK, context=CTX)
    assert new.wrapped[1:5] != old.wrapped[1:5]
    assert await hsm.unwrap(old, context=CTX) == bytearray(DEK)
    assert [k.version for k in await hsm.list_keys() if k.primary] == ["2"]


async def test_hsm_deleted_key_is_revocation(hsm: Pkcs11KeyProvider, softhsm_token: Any) -> None:
    import pkcs11
    from pkcs11 import Attribute, ObjectClass

    wrapped = await hsm.wrap(DEK, context=CTX)
    lib = pkcs11.lib(softhsm_token.module)
    with lib.get_token(token_label=softhsm_token.token_label).open(rw=True) as session:
        for key in session.get_objects(
            {Attribute.CLASS: ObjectClass.SECRET_KEY, Attribute.LABEL: hsm.key_label}
        ):
            key.destroy()
    with pytest.raises(KeyRevoked):
        await hsm.unwrap(wrapped, context=CTX)
    assert (await hsm.list_keys())[0].state == "missing"


async def test_an_envelope_for_local_hsm_and_kms_opens_with_any_one_alone(
    tmp_path: Path, hsm: Pkcs11KeyProvider, kms: KmsKeyProvider
) -> None:
    keyring = tmp_path / "keyring.json"
    LocalKeyring.create(keyring)
    local = LocalKeyProvider("local", keyring=keyring)
    providers: dict[str, KeyProvider] = {"local": local, "hsm": hsm, "kms": kms}
    writer = DataKeys(
        providers, write_keys=["local", "hsm", "kms"], settings=DataKeysConfig(), metrics=Metrics()
    )
    dek, wrapped = await writer.for_write("default")
    assert [w.provider for w in wrapped] == ["local", "hsm", "kms"]
    for only in providers:
        metrics = Metrics()
        reader = DataKeys(
            {only: providers[only]}, write_keys=[only], settings=DataKeysConfig(), metrics=metrics
        )
        assert await reader.unwrap(wrapped, store_id="default") == bytes(dek)
        answered = metrics.registry.get_sample_value(
            "secrets_agent_key_unwrap_provider_total", {"provider": only}
        )
        assert answered == 1


async def test_hsm_revocation_drops_that_keys_cached_data_keys(
    hsm: Pkcs11KeyProvider, softhsm_token: Any
) -> None:
    import pkcs11
    from pkcs11 import Attribute, ObjectClass

    metrics = Metrics()
    keys = DataKeys({"hsm": hsm}, write_keys=["hsm"], settings=DataKeysConfig(), metrics=metrics)
    _, cached = await keys.for_write("default")
    assert await keys.unwrap(cached, store_id="default")  # served from the cache
    other = await hsm.wrap(bytes(32), context=CTX)  # a DEK the cache does not hold
    lib = pkcs11.lib(softhsm_token.module)
    with lib.get_token(token_label=softhsm_token.token_label).open(rw=True) as session:
        for key in session.get_objects(
            {Attribute.CLASS: ObjectClass.SECRET_KEY, Attribute.LABEL: hsm.key_label}
        ):
            key.destroy()
    with pytest.raises(KeyRevoked):
        await keys.unwrap([other], store_id="default")
    dropped = metrics.registry.get_sample_value(
        "secrets_agent_datakey_cache_events_total", {"event": "dropped"}
    )
    assert dropped and dropped >= 1
    with pytest.raises(KeyRevoked):  # the cached DEK went with the revocation
        await keys.unwrap(cached, store_id="default")
