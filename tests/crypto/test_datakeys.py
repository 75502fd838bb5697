"""DataKeys: DEK reuse on write, the unwrapped-DEK cache, single-flight and recipients."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Sequence
from typing import Any

import pytest

from agent.config import DataKeysConfig
from agent.crypto.datakeys import DataKeys
from agent.crypto.envelope import WrappedKey, wrap_context
from agent.errors import DecryptionError, KeyRevoked, KeyUnavailable
from agent.metrics import Metrics
from tests.fakes import FakeKeyProvider

STORE = "default"


class FakeClock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def metrics() -> Metrics:
    return Metrics()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def a() -> FakeKeyProvider:
    return FakeKeyProvider("a")


@pytest.fixture
def b() -> FakeKeyProvider:
    return FakeKeyProvider("b")


def datakeys(
    *providers: FakeKeyProvider,
    metrics: Metrics,
    clock: FakeClock | None = None,
    write_keys: Sequence[str] | None = None,
    **settings: Any,
) -> DataKeys:
    return DataKeys(
        {p.name: p for p in providers},
        write_keys=write_keys or [providers[0].name],
        settings=DataKeysConfig(**settings),
        metrics=metrics,
        clock=clock or FakeClock(),
    )


async def envelope_keys(
    *providers: FakeKeyProvider, store: str = STORE
) -> tuple[bytes, list[WrappedKey]]:
    """A fresh DEK wrapped by each provider (these wrap calls are then forgotten)."""
    dek = os.urandom(32)
    keys = [await p.wrap(dek, context=wrap_context(store)) for p in providers]
    for p in providers:
        p.calls.clear()
        p.entered.clear()
    return dek, keys


def events(metrics: Metrics, event: str) -> float:
    value = metrics.registry.get_sample_value(
        "secrets_agent_datakey_cache_events_total", {"event": event}
    )
    return value or 0.0


def answered(metrics: Metrics, provider: str) -> float:
    value = metrics.registry.get_sample_value(
        "secrets_agent_key_unwrap_provider_total", {"provider": provider}
    )
    return value or 0.0


def generated(metrics: Metrics) -> float:
    return metrics.registry.get_sample_value("secrets_agent_datakeys_generated_total") or 0.0


def cache_size(metrics: Metrics) -> float | None:
    return metrics.registry.get_sample_value("secrets_agent_datakey_cache_entries")


def wiped(buf: bytearray) -> bool:
    return len(buf) == 32 and not any(buf)


# --------------------------------------------------------------------------- write side


async def test_1000_writes_cost_one_generation_and_one_wrap_per_provider(
    a: FakeKeyProvider, b: FakeKeyProvider, metrics: Metrics
) -> None:
    dk = datakeys(a, b, metrics=metrics, write_keys=["b", "a"])
    results = [await dk.for_write(STORE) for _ in range(1000)]
    assert len({dek for dek, _ in results}) == 1
    assert len({wrapped for _, wrapped in results}) == 1
    assert [w.provider for w in results[0][1]] == ["b", "a"]
    assert (a.calls["wrap"], b.calls["wrap"], generated(metrics)) == (1, 1, 1)
    dek, _ = await dk.for_write(STORE)  # the 1001st envelope: max_messages is 1000
    assert dek != results[0][0]
    assert (a.calls["wrap"], b.calls["wrap"], generated(metrics)) == (2, 2, 2)


async def test_concurrent_writers_share_one_generation(
    a: FakeKeyProvider, metrics: Metrics
) -> None:
    dk = datakeys(a, metrics=metrics)
    a.gate = asyncio.Event()
    tasks = [asyncio.create_task(dk.for_write(STORE)) for _ in range(20)]
    await a.entered.wait()
    a.gate.set()
    results = await asyncio.gather(*tasks)
    assert len(set(results)) == 1
    assert a.calls["wrap"] == 1


async def test_max_messages_forces_a_new_dek(a: FakeKeyProvider, metrics: Metrics) -> None:
    dk = datakeys(a, metrics=metrics, max_messages=3)
    deks = [(await dk.for_write(STORE))[0] for _ in range(7)]
    assert deks[0:3] == [deks[0]] * 3
    assert deks[3:6] == [deks[3]] * 3
    assert len(set(deks)) == 3
    assert a.calls["wrap"] == 3


async def test_max_age_forces_a_new_dek(
    a: FakeKeyProvider, metrics: Metrics, clock: FakeClock
) -> None:
    dk = datakeys(a, metrics=metrics, clock=clock, max_age=60)
    first, _ = await dk.for_write(STORE)
    clock.now += 59.9
    assert (await dk.for_write(STORE))[0] == first
    clock.now += 0.1
    assert (await dk.for_write(STORE))[0] != first
    assert a.calls["wrap"] == 2


async def test_each_store_gets_its_own_dek_wrapped_with_its_context(
    a: FakeKeyProvider, metrics: Metrics
) -> None:
    dk = datakeys(a, metrics=metrics)
    dek1, (wrapped1,) = await dk.for_write("one")
    dek2, _ = await dk.for_write("two")
    assert dek1 != dek2
    assert await a.unwrap(wrapped1, context=wrap_context("one")) == bytearray(dek1)
    with pytest.raises(DecryptionError):
        await a.unwrap(wrapped1, context=wrap_context("two"))


async def test_a_failed_wrap_keeps_nothing(a: FakeKeyProvider, metrics: Metrics) -> None:
    dk = datakeys(a, metrics=metrics)
    a.error = KeyUnavailable("kms down")
    with pytest.raises(KeyUnavailable):
        await dk.for_write(STORE)
    a.error = None
    await dk.for_write(STORE)
    assert (a.calls["wrap"], generated(metrics)) == (2, 1)


async def test_reading_back_a_written_dek_needs_no_unwrap(
    a: FakeKeyProvider, b: FakeKeyProvider, metrics: Metrics
) -> None:
    dk = datakeys(a, b, metrics=metrics, write_keys=["a", "b"])
    dek, wrapped = await dk.for_write(STORE)
    assert await dk.unwrap(wrapped, store_id=STORE) == dek
    assert await dk.unwrap(wrapped[1:], store_id=STORE) == dek  # seeded under each form
    assert (a.calls["unwrap"], b.calls["unwrap"], events(metrics, "hit")) == (0, 0, 2)
    with pytest.raises(DecryptionError):  # not a hit: the wraps are bound to STORE
        await dk.unwrap(wrapped, store_id="elsewhere")
    assert (a.calls["unwrap"], b.calls["unwrap"]) == (1, 1)


# --------------------------------------------------------------------------- read cache


async def test_50_concurrent_unwraps_of_one_envelope_cost_one_provider_call(
    a: FakeKeyProvider, metrics: Metrics
) -> None:
    dk = datakeys(a, metrics=metrics)
    dek, keys = await envelope_keys(a)
    a.gate = asyncio.Event()
    tasks = [asyncio.create_task(dk.unwrap(keys, store_id=STORE)) for _ in range(50)]
    # Tasks run in creation order, so all 50 have asked before the first
    # provider call (made by a task created after them) sets `entered`.
    await a.entered.wait()
    assert a.calls["unwrap"] == 1
    assert not any(t.done() for t in tasks)
    a.gate.set()
    assert await asyncio.gather(*tasks) == [dek] * 50
    assert a.calls["unwrap"] == 1
    assert await dk.unwrap(keys, store_id=STORE) == dek
    assert (events(metrics, "miss"), events(metrics, "hit")) == (50, 1)
    assert cache_size(metrics) == 1


async def test_a_cancelled_waiter_does_not_cancel_the_shared_unwrap(
    a: FakeKeyProvider, metrics: Metrics
) -> None:
    dk = datakeys(a, metrics=metrics)
    dek, keys = await envelope_keys(a)
    a.gate = asyncio.Event()
    leader, *others = [asyncio.create_task(dk.unwrap(keys, store_id=STORE)) for _ in range(3)]
    await a.entered.wait()
    leader.cancel()
    with pytest.raises(asyncio.CancelledError):
        await leader
    a.gate.set()
    assert await asyncio.gather(*others) == [dek, dek]
    assert await dk.unwrap(keys, store_id=STORE) == dek
    assert a.calls["unwrap"] == 1


async def test_a_failure_is_not_cached(a: FakeKeyProvider, metrics: Metrics) -> None:
    dk = datakeys(a, metrics=metrics)
    dek, keys = await envelope_keys(a)
    a.error = KeyUnavailable("kms throttled")
    with pytest.raises(KeyUnavailable):
        await dk.unwrap(keys, store_id=STORE)
    a.error = None
    assert await dk.unwrap(keys, store_id=STORE) == dek
    assert a.calls["unwrap"] == 2


async def test_lru_eviction_wipes_the_least_recently_used_dek(
    a: FakeKeyProvider, metrics: Metrics
) -> None:
    dk = datakeys(a, metrics=metrics, cache_capacity=2)
    (dek1, keys1), (_, keys2), (_, keys3) = [await envelope_keys(a) for _ in range(3)]
    await dk.unwrap(keys1, store_id=STORE)
    await dk.unwrap(keys2, store_id=STORE)
    await dk.unwrap(keys1, store_id=STORE)  # keys1 is now the most recently used
    await dk.unwrap(keys3, store_id=STORE)
    buf1, buf2, buf3 = a.unwrapped
    assert wiped(buf2)
    assert bytes(buf1) == dek1 and not wiped(buf3)
    assert (events(metrics, "evicted"), cache_size(metrics)) == (1, 2)
    assert a.calls["unwrap"] == 3
    await dk.unwrap(keys1, store_id=STORE)
    assert a.calls["unwrap"] == 3
    await dk.unwrap(keys2, store_id=STORE)
    assert a.calls["unwrap"] == 4


async def test_max_uses_exhausts_and_wipes_an_entry(a: FakeKeyProvider, metrics: Metrics) -> None:
    dk = datakeys(a, metrics=metrics, max_uses=3)
    dek, keys = await envelope_keys(a)
    for _ in range(4):  # one unwrap, then three hits
        assert await dk.unwrap(keys, store_id=STORE) == dek
    assert a.calls["unwrap"] == 1
    assert await dk.unwrap(keys, store_id=STORE) == dek
    assert a.calls["unwrap"] == 2
    assert wiped(a.unwrapped[0]) and not wiped(a.unwrapped[1])
    assert events(metrics, "exhausted") == 1


async def test_max_age_expires_and_wipes_an_entry(
    a: FakeKeyProvider, metrics: Metrics, clock: FakeClock
) -> None:
    dk = datakeys(a, metrics=metrics, clock=clock, max_age=10)
    dek, keys = await envelope_keys(a)
    await dk.unwrap(keys, store_id=STORE)
    clock.now += 9.9
    await dk.unwrap(keys, store_id=STORE)
    assert a.calls["unwrap"] == 1
    clock.now += 0.1
    assert await dk.unwrap(keys, store_id=STORE) == dek
    assert a.calls["unwrap"] == 2
    assert wiped(a.unwrapped[0])
    assert events(metrics, "expired") == 1


async def test_key_revoked_drops_every_cached_dek_of_that_key(
    a: FakeKeyProvider, b: FakeKeyProvider, metrics: Metrics
) -> None:
    dk = datakeys(a, b, metrics=metrics)
    (_, keys1), (_, keys2), (_, keys3) = [await envelope_keys(a) for _ in range(3)]
    _, keys_b = await envelope_keys(b)
    for keys in (keys1, keys2, keys_b):
        await dk.unwrap(keys, store_id=STORE)
    a.error = KeyRevoked("key disabled", provider="a", key="master")
    with pytest.raises(KeyRevoked) as info:
        await dk.unwrap(keys3, store_id=STORE)
    assert (info.value.provider, info.value.key) == ("a", "master")
    assert events(metrics, "dropped") == 2
    assert wiped(a.unwrapped[0]) and wiped(a.unwrapped[1]) and not wiped(b.unwrapped[0])
    a.error = None
    await dk.unwrap(keys1, store_id=STORE)  # asks the provider again
    await dk.unwrap(keys_b, store_id=STORE)  # another provider's key is still cached
    assert (a.calls["unwrap"], b.calls["unwrap"]) == (4, 1)


async def test_drop_forgets_a_providers_keys_on_both_sides(
    a: FakeKeyProvider, metrics: Metrics
) -> None:
    dk = datakeys(a, metrics=metrics)
    dek, _ = await dk.for_write(STORE)
    dk.drop("a")
    assert (events(metrics, "dropped"), cache_size(metrics)) == (1, 0)
    assert (await dk.for_write(STORE))[0] != dek
    assert a.calls["wrap"] == 2


async def test_aclose_wipes_every_dek(a: FakeKeyProvider, metrics: Metrics) -> None:
    dk = datakeys(a, metrics=metrics)
    _, keys = await envelope_keys(a)
    await dk.unwrap(keys, store_id=STORE)
    await dk.aclose()
    assert wiped(a.unwrapped[0])
    assert cache_size(metrics) == 0


# --------------------------------------------------------------------------- recipients


async def test_first_provider_unavailable_second_answers_counted_per_provider(
    a: FakeKeyProvider, b: FakeKeyProvider, metrics: Metrics
) -> None:
    dk = datakeys(a, b, metrics=metrics)
    dek, keys = await envelope_keys(a, b)
    a.error = KeyUnavailable("region down")
    assert await dk.unwrap(keys, store_id=STORE) == dek
    assert (a.calls["unwrap"], b.calls["unwrap"]) == (1, 1)
    assert (answered(metrics, "a"), answered(metrics, "b")) == (0, 1)
    a.error = None
    dek2, keys2 = await envelope_keys(a, b)
    assert await dk.unwrap(keys2, store_id=STORE) == dek2
    assert (answered(metrics, "a"), answered(metrics, "b")) == (1, 1)
    assert b.calls["unwrap"] == 0  # a answered first this time


async def test_recipients_are_tried_in_the_configured_providers_order(
    a: FakeKeyProvider, b: FakeKeyProvider, metrics: Metrics
) -> None:
    dk = datakeys(b, a, metrics=metrics)
    dek, keys = await envelope_keys(a, b)
    assert await dk.unwrap(keys, store_id=STORE) == dek
    assert (a.calls["unwrap"], b.calls["unwrap"]) == (0, 1)


async def test_a_revoked_recipient_falls_through_to_the_next(
    a: FakeKeyProvider, b: FakeKeyProvider, metrics: Metrics
) -> None:
    dk = datakeys(a, b, metrics=metrics)
    dek, keys = await envelope_keys(a, b)
    a.error = KeyRevoked("access revoked", provider="a", key="master")
    assert await dk.unwrap(keys, store_id=STORE) == dek
    assert answered(metrics, "b") == 1


async def test_all_transient_failures_raise_key_unavailable(
    a: FakeKeyProvider, b: FakeKeyProvider, metrics: Metrics
) -> None:
    dk = datakeys(a, b, metrics=metrics)
    dek, keys = await envelope_keys(a, b)
    a.error = KeyUnavailable("region down")
    b.error = KeyUnavailable("hsm busy", retry_after=5)
    with pytest.raises(KeyUnavailable, match="a/master: region down; b/master: hsm busy") as info:
        await dk.unwrap(keys, store_id=STORE)
    assert info.value.retry_after == 5
    assert dek.hex() not in str(info.value)


async def test_one_transient_failure_among_permanent_ones_raises_key_unavailable(
    a: FakeKeyProvider, b: FakeKeyProvider, metrics: Metrics
) -> None:
    dk = datakeys(a, b, metrics=metrics)
    _, keys = await envelope_keys(a, b)
    tampered = WrappedKey("a", "master", keys[0].wrapped[:-1] + b"\x00")
    b.error = KeyUnavailable("hsm busy")
    with pytest.raises(KeyUnavailable):
        await dk.unwrap([tampered, keys[1]], store_id=STORE)


async def test_all_permanent_failures_raise_decryption_error_naming_each(
    a: FakeKeyProvider, b: FakeKeyProvider, metrics: Metrics
) -> None:
    dk = datakeys(a, b, metrics=metrics)
    dek, keys = await envelope_keys(a, b)
    with pytest.raises(DecryptionError) as info:
        await dk.unwrap(keys, store_id="another-store")  # wrapped for STORE's context
    assert not isinstance(info.value, (KeyUnavailable, KeyRevoked))
    assert "a/master: fake provider 'a'" in info.value.message
    assert "b/master: fake provider 'b'" in info.value.message
    assert dek.hex() not in info.value.message


async def test_no_configured_recipient_is_a_clear_error(
    a: FakeKeyProvider, b: FakeKeyProvider, metrics: Metrics
) -> None:
    dk = datakeys(a, metrics=metrics)
    _, keys = await envelope_keys(b)
    with pytest.raises(DecryptionError, match=r"\(recipients: b/master\)"):
        await dk.unwrap(keys, store_id=STORE)
    assert b.calls["unwrap"] == 0


async def test_unknown_providers_are_skipped(
    a: FakeKeyProvider, b: FakeKeyProvider, metrics: Metrics
) -> None:
    dk = datakeys(a, metrics=metrics)
    dek, keys = await envelope_keys(b, a)
    assert await dk.unwrap(keys, store_id=STORE) == dek
    assert (a.calls["unwrap"], b.calls["unwrap"]) == (1, 0)
