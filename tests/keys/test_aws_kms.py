"""The AWS KMS key provider against moto's standalone server, over HTTP.

moto checks the encryption context and the key a blob belongs to, but it lets a
disabled or pending-deletion key encrypt and decrypt. ``KmsFront`` is a small
HTTP front for moto that adds what real KMS does there (``DisabledException``,
``KMSInvalidStateException``, from the key's state in moto) and can inject the
transient failures KMS has (throttling, 5xx, slow answers), so the provider's
error mapping is tested through botocore's real parsing of real responses.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import boto3
import pytest
from aiohttp import web

from agent.config import DataKeysConfig, parse_config
from agent.crypto.datakeys import DataKeys
from agent.crypto.envelope import WrappedKey, wrap_context
from agent.errors import BadRequest, DecryptionError, KeyRevoked, KeyUnavailable
from agent.keys import create_provider
from agent.keys.aws_kms import KmsKeyProvider, _check
from agent.metrics import Metrics

pytestmark = pytest.mark.integration
CTX = wrap_context("default")
DEK = bytes(range(32))
_STATE_ERRORS = {
    "Disabled": "DisabledException",
    "PendingDeletion": "KMSInvalidStateException",
}


class KmsFront:
    """Forwards KMS requests to moto, refusing crypto with disabled keys like KMS does."""

    def __init__(self, moto_url: str) -> None:
        self.moto_url = moto_url
        self.boto = boto3.client("kms", region_name="us-east-1", endpoint_url=moto_url)
        self.fail: tuple[int, str] | None = None  # (HTTP status, error code) for every call
        self.delay = 0.0
        self.calls: list[str] = []
        self.bodies: list[dict[str, Any]] = []  # each request's JSON, as KMS received it
        self.url = ""
        self._runner: web.AppRunner | None = None
        self._http: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/", self._handle)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = self._runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{port}"
        self._http = aiohttp.ClientSession()

    async def stop(self) -> None:
        if self._http is not None:
            await self._http.close()
        if self._runner is not None:
            await self._runner.cleanup()

    def _state(self, key_id: str) -> str:
        try:
            return str(self.boto.describe_key(KeyId=key_id)["KeyMetadata"]["KeyState"])
        except self.boto.exceptions.NotFoundException:
            return "missing"  # moto answers for itself

    async def _handle(self, request: web.Request) -> web.Response:
        operation = request.headers.get("X-Amz-Target", "").rsplit(".", 1)[-1]
        body = await request.read()
        self.calls.append(operation)
        self.bodies.append(json.loads(body or b"{}"))
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.fail is not None:
            return _error(*self.fail)
        key_id = json.loads(body or b"{}").get("KeyId")
        if operation in ("Encrypt", "Decrypt", "GenerateDataKey") and key_id:
            state = await asyncio.to_thread(self._state, key_id)
            if state in _STATE_ERRORS:
                return _error(400, _STATE_ERRORS[state])
        assert self._http is not None
        headers = {
            k: v for k, v in request.headers.items() if k.lower() not in ("host", "content-length")
        }
        async with self._http.post(self.moto_url + "/", data=body, headers=headers) as resp:
            return web.Response(
                status=resp.status, body=await resp.read(), content_type=resp.content_type
            )


def _error(status: int, code: str) -> web.Response:
    doc = {"__type": code, "message": f"injected {code}"}
    return web.Response(
        status=status, text=json.dumps(doc), content_type="application/x-amz-json-1.1"
    )


def _key_id(arn: str) -> str:
    return arn.rsplit("/", 1)[1]  # moto's DisableKey and friends want the bare id


def _moto(server: Any) -> Any:
    return boto3.client("kms", region_name="us-east-1", endpoint_url=server.endpoint_url)


def _new_key(server: Any) -> tuple[str, str]:
    """A new KMS key in moto and an alias for it: (key id, alias)."""
    client = _moto(server)
    key_id = client.create_key(Description="secrets-agent test")["KeyMetadata"]["KeyId"]
    alias = f"alias/sa-{uuid.uuid4().hex[:8]}"
    client.create_alias(AliasName=alias, TargetKeyId=key_id)
    return key_id, alias


def _count(metrics: Metrics, operation: str, outcome: str) -> float:
    value = metrics.registry.get_sample_value(
        "secrets_agent_key_operations_total",
        {"provider": "kms", "operation": operation, "outcome": outcome},
    )
    return value or 0.0


def _flip(wrapped: WrappedKey, index: int) -> WrappedKey:
    blob = bytearray(wrapped.wrapped)
    blob[index] ^= 0x01
    return WrappedKey(wrapped.provider, wrapped.key, bytes(blob))


def _forged(wrapped: WrappedKey, context: dict[str, str], ciphertext: bytes) -> WrappedKey:
    """A blob whose (unkeyed) check is recomputed: only KMS itself can refuse it."""
    return WrappedKey(
        wrapped.provider, wrapped.key, b"\x01" + _check(context, ciphertext) + ciphertext
    )


@pytest.fixture
async def front(moto_server: Any) -> AsyncIterator[KmsFront]:
    proxy = KmsFront(moto_server.endpoint_url)
    await proxy.start()
    yield proxy
    await proxy.stop()


@pytest.fixture
async def kms(moto_server: Any, front: KmsFront) -> AsyncIterator[KmsKeyProvider]:
    """A provider on a fresh key, configured by alias, talking to KMS through the front."""
    _, alias = _new_key(moto_server)
    config = parse_config(
        {
            "keys": {
                "kms": {
                    "type": "aws-kms",
                    "key_id": alias,
                    "region": "us-east-1",
                    "endpoint_url": front.url,
                    "timeout": "1s",
                }
            },
            "write_keys": ["kms"],
        }
    )
    provider = create_provider("kms", config.keys["kms"], config=config, metrics=Metrics())
    assert isinstance(provider, KmsKeyProvider)
    yield provider
    await provider.aclose()


async def test_round_trip_records_the_key_arn_and_resolves_the_alias_once(
    kms: KmsKeyProvider, front: KmsFront
) -> None:
    first = await kms.wrap(DEK, context=CTX)
    second = await kms.wrap(DEK, context=CTX)
    assert first.key == second.key
    assert first.key.startswith("arn:aws:kms:us-east-1:") and ":key/" in first.key
    assert DEK not in first.wrapped
    assert await kms.unwrap(first, context=CTX) == bytearray(DEK)
    assert front.calls == ["DescribeKey", "Encrypt", "Encrypt", "Decrypt"]
    assert await kms.is_current(first)
    assert not await kms.is_current(WrappedKey("kms", first.key.replace("key/", "key/0"), b""))


async def test_corrupted_blobs_are_refused_before_any_kms_call(
    kms: KmsKeyProvider, front: KmsFront
) -> None:
    wrapped = await kms.wrap(DEK, context=CTX)
    front.calls.clear()
    for index in range(len(wrapped.wrapped)):
        with pytest.raises(DecryptionError) as caught:
            await kms.unwrap(_flip(wrapped, index), context=CTX)
        assert not isinstance(caught.value, KeyRevoked), index
    assert front.calls == []


async def test_a_blob_for_another_context_is_refused_by_us_and_by_kms(
    kms: KmsKeyProvider, front: KmsFront
) -> None:
    wrapped = await kms.wrap(DEK, context=CTX)
    front.calls.clear()
    other = wrap_context("other-store")
    with pytest.raises(DecryptionError, match="another context"):
        await kms.unwrap(wrapped, context=other)
    assert front.calls == []  # our check, no call
    ciphertext = wrapped.wrapped[17:]
    with pytest.raises(DecryptionError, match="InvalidCiphertextException") as caught:
        await kms.unwrap(_forged(wrapped, other, ciphertext), context=other)
    assert not isinstance(caught.value, KeyRevoked)
    assert front.calls == ["Decrypt"]  # the forged check got past us; KMS bound the context


async def test_a_forged_ciphertext_is_refused_by_kms(kms: KmsKeyProvider) -> None:
    wrapped = await kms.wrap(DEK, context=CTX)
    ciphertext = bytearray(wrapped.wrapped[17:])
    ciphertext[-1] ^= 0x01  # the GCM tag of moto's blob
    with pytest.raises(DecryptionError, match="InvalidCiphertextException"):
        await kms.unwrap(_forged(wrapped, CTX, bytes(ciphertext)), context=CTX)


async def test_a_disabled_key_is_revocation_that_drops_its_cached_data_keys(
    kms: KmsKeyProvider, moto_server: Any
) -> None:
    metrics = Metrics()
    keys = DataKeys({"kms": kms}, write_keys=["kms"], settings=DataKeysConfig(), metrics=metrics)
    _, cached = await keys.for_write("default")
    other = await kms.wrap(bytes(32), context=CTX)  # a data key the cache does not hold
    _moto(moto_server).disable_key(KeyId=_key_id(cached[0].key))
    with pytest.raises(KeyRevoked, match="DisabledException"):
        await keys.unwrap([other], store_id="default")
    dropped = metrics.registry.get_sample_value(
        "secrets_agent_datakey_cache_events_total", {"event": "dropped"}
    )
    assert dropped == 1
    with pytest.raises(KeyRevoked):  # no longer served from the cache
        await keys.unwrap(cached, store_id="default")
    assert [k.state for k in await kms.list_keys()] == ["disabled"]
    assert kms.status()["state"] == "revoked"
    _moto(moto_server).enable_key(KeyId=_key_id(cached[0].key))
    assert await keys.unwrap(cached, store_id="default")
    assert kms.status()["state"] == "ok"
    await keys.aclose()


async def test_a_key_pending_deletion_is_revocation_and_listed_as_deleted(
    kms: KmsKeyProvider, moto_server: Any
) -> None:
    wrapped = await kms.wrap(DEK, context=CTX)
    _moto(moto_server).schedule_key_deletion(KeyId=_key_id(wrapped.key), PendingWindowInDays=7)
    with pytest.raises(KeyRevoked, match="KMSInvalidStateException") as caught:
        await kms.unwrap(wrapped, context=CTX)
    assert (caught.value.provider, caught.value.key) == ("kms", wrapped.key)
    (info,) = await kms.list_keys()
    assert (info.key, info.state) == (wrapped.key, "deleted")


async def test_a_blob_of_a_key_that_does_not_exist_is_revocation(kms: KmsKeyProvider) -> None:
    wrapped = await kms.wrap(DEK, context=CTX)
    gone = "arn:aws:kms:us-east-1:123456789012:key/00000000-0000-0000-0000-000000000000"
    with pytest.raises(KeyRevoked, match="NotFoundException"):
        await kms.unwrap(WrappedKey("kms", gone, wrapped.wrapped), context=CTX)


@pytest.mark.parametrize(
    ("status", "code"),
    [
        (400, "ThrottlingException"),
        (400, "LimitExceededException"),
        (500, "KMSInternalException"),
        (503, "ServiceUnavailable"),
    ],
)
async def test_throttling_and_5xx_are_transient_and_keep_cached_data_keys(
    kms: KmsKeyProvider, front: KmsFront, status: int, code: str
) -> None:
    metrics = Metrics()
    keys = DataKeys({"kms": kms}, write_keys=["kms"], settings=DataKeysConfig(), metrics=metrics)
    _, cached = await keys.for_write("default")
    other = await kms.wrap(bytes(32), context=CTX)
    front.fail = (status, code)
    with pytest.raises(KeyUnavailable, match=code):
        await keys.unwrap([other], store_id="default")
    assert await keys.unwrap(cached, store_id="default")  # still cached
    assert kms.status()["state"] == "unavailable"
    front.fail = None
    assert await keys.unwrap([other], store_id="default")
    await keys.aclose()


async def test_a_slow_kms_times_out_as_transient(kms: KmsKeyProvider, front: KmsFront) -> None:
    wrapped = await kms.wrap(DEK, context=CTX)
    front.delay = 10.0  # the provider's timeout is 1 s
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(KeyUnavailable):
        await kms.unwrap(wrapped, context=CTX)
    assert loop.time() - started < 8.0  # bounded, not the 10 s the server takes


async def test_an_unreachable_endpoint_is_transient(moto_server: Any) -> None:
    _, alias = _new_key(moto_server)
    provider = KmsKeyProvider(
        "kms", key_id=alias, region="us-east-1", endpoint_url="http://127.0.0.1:9", timeout=1
    )
    with pytest.raises(KeyUnavailable):
        await provider.wrap(DEK, context=CTX)
    assert [k.state for k in await provider.list_keys()] == ["unavailable"]
    await provider.aclose()


async def test_calls_are_counted_per_outcome(moto_server: Any, front: KmsFront) -> None:
    _, alias = _new_key(moto_server)
    metrics = Metrics()
    provider = KmsKeyProvider(
        "kms", key_id=alias, region="us-east-1", endpoint_url=front.url, metrics=metrics
    )
    wrapped = await provider.wrap(DEK, context=CTX)
    await provider.unwrap(wrapped, context=CTX)
    _moto(moto_server).disable_key(KeyId=_key_id(wrapped.key))
    with pytest.raises(KeyRevoked):
        await provider.unwrap(wrapped, context=CTX)
    assert (_count(metrics, "describe", "ok"), _count(metrics, "wrap", "ok")) == (1, 1)
    assert (_count(metrics, "unwrap", "ok"), _count(metrics, "unwrap", "revoked")) == (1, 1)
    timed = metrics.registry.get_sample_value(
        "secrets_agent_key_operation_seconds_count", {"provider": "kms", "operation": "unwrap"}
    )
    assert timed == 2
    await provider.aclose()


async def test_keys_list_rotate_and_create(kms: KmsKeyProvider, moto_server: Any) -> None:
    (info,) = await kms.list_keys()
    assert info.state == "enabled" and info.primary and info.key.startswith("arn:aws:kms:")
    rotated = await kms.rotate_key()
    assert rotated.key == info.key and "rotation enabled" in rotated.detail
    status = _moto(moto_server).get_key_rotation_status(KeyId=info.key)
    assert status["KeyRotationEnabled"] is True
    with pytest.raises(BadRequest, match="infrastructure"):
        await kms.create_key()


async def test_rotate_every_turns_on_kms_rotation_with_that_period(
    kms: KmsKeyProvider, moto_server: Any, front: KmsFront
) -> None:
    from agent.audit import NullAudit
    from agent.config import DataKeysConfig
    from agent.crypto.datakeys import DataKeys
    from agent.keyrotation import KeyRotation

    metrics = Metrics()
    datakeys = DataKeys(
        {"kms": kms}, write_keys=["kms"], settings=DataKeysConfig(), metrics=metrics
    )
    rotation = KeyRotation(
        {"kms": kms}, {"kms": 180 * 86400.0}, datakeys, metrics=metrics, audit=NullAudit()
    )
    await rotation.check_once()
    (info,) = await kms.list_keys()
    status = _moto(moto_server).get_key_rotation_status(KeyId=info.key)
    assert status["KeyRotationEnabled"] is True
    # moto does not keep the period, so check the request KMS received
    (request,) = [
        b for op, b in zip(front.calls, front.bodies, strict=True) if op == "EnableKeyRotation"
    ]
    assert request == {"KeyId": info.key, "RotationPeriodInDays": 180}
    await rotation.check_once()  # enabled once, not on every check
    assert front.calls.count("EnableKeyRotation") == 1
    assert rotation.status()["key_rotation"] == [
        {"provider": "kms", "every_seconds": 180 * 86400.0, "next_due": None, "last_error": None}
    ]
