"""Cache and refresher semantics on fakes: cheap checks, stale-if-error, deletion, stages."""

from __future__ import annotations

import logging
from typing import Any

import pytest

from agent.cache import SecretCache
from agent.config import DataKeysConfig, RefreshConfig
from agent.crypto.datakeys import DataKeys
from agent.errors import (
    BackendUnavailable,
    DecryptionError,
    SecretNotFound,
    StaleTooLong,
    VersionNotFound,
)
from agent.metrics import Metrics
from agent.refresh import Backoff, Refresher
from agent.resolver import Resolver
from agent.writer import SecretWriter
from tests.fakes import FakeKeyProvider, MemoryStore


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class World:
    """A store, a key provider, a writer and an agent-side cache + refresher over them."""

    def __init__(self, **refresh: Any) -> None:
        self.store = MemoryStore()
        self.provider = FakeKeyProvider("local")
        self.metrics = Metrics()
        self.clock = Clock()
        self.datakeys = DataKeys(
            {"local": self.provider},
            write_keys=["local"],
            settings=DataKeysConfig(),
            metrics=self.metrics,
            clock=self.clock,
        )
        settings = RefreshConfig(**{"backoff_initial": 0.01, "backoff_max": 0.05, **refresh})
        # The writer is another process: its own data keys and store client.
        writer_keys = DataKeys(
            {"local": self.provider},
            write_keys=["local"],
            settings=DataKeysConfig(),
            metrics=Metrics(),
        )
        self.writer = SecretWriter(self.store.twin(), writer_keys)
        self.cache = SecretCache(
            Resolver(self.store, self.datakeys, metrics=self.metrics),
            settings=settings,
            metrics=self.metrics,
            clock=self.clock,
        )
        self.refresher = Refresher(
            self.cache,
            self.store,
            settings=settings,
            patterns=["*"],
            metrics=self.metrics,
            clock=self.clock,
        )

    def sample(self, name: str, **labels: str) -> float:
        return self.metrics.registry.get_sample_value(name, labels) or 0.0

    def decrypts(self) -> float:
        return self.sample("secrets_agent_decrypts_total", outcome="ok")

    def fetches(self) -> float:
        return self.sample("secrets_agent_secret_fetches_total", outcome="ok")

    async def value(self, name: str, **kw: Any) -> bytes:
        return (await self.cache.get(name, **kw)).secret.value.reveal()


async def test_polling_1000_unchanged_secrets_costs_no_decrypts_and_no_unwraps() -> None:
    w = World()
    for i in range(1000):
        await w.writer.put(f"s/{i:04d}", f"v{i}".encode())
    await w.refresher.load_all()
    assert len(w.cache.names()) == 1000
    decrypts, unwraps, fetches = w.decrypts(), w.provider.calls["unwrap"], w.fetches()
    assert decrypts == 1000
    for _ in range(3):
        await w.refresher.resync(trigger="poll")
    assert w.decrypts() == decrypts
    assert w.fetches() == fetches
    assert w.provider.calls["unwrap"] == unwraps
    assert w.sample("secrets_agent_version_checks_total", outcome="unchanged") == 3000


async def test_a_rotation_costs_exactly_one_fetch_and_decrypt() -> None:
    w = World()
    await w.writer.put("db", b"v1")
    await w.refresher.load_all()
    before = w.decrypts()
    for i in range(2, 12):
        await w.writer.put("db", f"v{i}".encode())
        assert await w.cache.refresh("db")
        assert await w.value("db") == f"v{i}".encode()
        assert await w.value("db", stage="PREVIOUS") == f"v{i - 1}".encode()
    assert w.decrypts() - before == 10


async def test_pending_is_visible_only_when_asked_for() -> None:
    w = World()
    await w.writer.put("db", b"current")
    await w.writer.put("db", b"pending", stage="PENDING")
    await w.refresher.load_all()
    assert await w.value("db") == b"current"
    assert await w.value("db", stage="AWSPENDING") == b"pending"
    result = await w.writer.promote("db", "CURRENT", w.cache.stage_map("db").stages["PENDING"])
    assert result.stages["PREVIOUS"] != result.stages["CURRENT"]
    await w.cache.refresh("db")
    assert await w.value("db") == b"pending"
    assert await w.value("db", stage="PREVIOUS") == b"current"


async def test_transient_errors_serve_stale_until_max_stale_then_503() -> None:
    w = World(max_stale=60)
    await w.writer.put("db", b"good")
    await w.refresher.load_all()
    w.store.unavailable = True
    with pytest.raises(BackendUnavailable):
        await w.cache.refresh("db")
    w.clock.now += 30
    lookup = await w.cache.get("db")
    assert lookup.stale and lookup.secret.value.reveal() == b"good"
    assert lookup.age == pytest.approx(30)
    w.clock.now += 31
    with pytest.raises(StaleTooLong) as info:
        await w.cache.get("db")
    assert info.value.status == 503 and info.value.retry_after > 0
    w.store.unavailable = False
    await w.cache.refresh("db")
    lookup = await w.cache.get("db")
    assert not lookup.stale and lookup.secret.value.reveal() == b"good"


async def test_not_found_and_decryption_errors_never_fall_back_to_stale() -> None:
    w = World()
    await w.writer.put("db", b"v1")
    await w.refresher.load_all()
    # A version id that does not exist is an error, not the cached CURRENT.
    with pytest.raises(VersionNotFound):
        await w.cache.get("db", version="nope")
    # A key provider that refuses (permanent) does not make a stale answer.
    await w.writer.put("db", b"v2")
    w.provider.error = DecryptionError("wrapped key refused (test)")
    w.datakeys.drop("local")
    with pytest.raises(DecryptionError):
        await w.cache.refresh("db")
    lookup = await w.cache.get("db")
    assert not lookup.stale  # the last good value stays in service, but is not "stale"
    assert lookup.secret.value.reveal() == b"v1"


async def test_a_deleted_secret_disappears_after_the_grace_period() -> None:
    w = World(delete_grace=300)
    await w.writer.put("gone", b"v")
    await w.refresher.load_all()
    w.store.delete("gone")
    assert not await w.cache.refresh("gone")
    assert await w.value("gone") == b"v"  # still served during the grace period
    w.clock.now += 301
    assert await w.cache.refresh("gone")
    assert "gone" not in w.cache.names()
    assert w.sample("secrets_agent_secrets_removed_total") == 1
    with pytest.raises(SecretNotFound):
        await w.cache.get("gone")


async def test_forced_refreshes_are_rate_limited_per_secret() -> None:
    w = World(request_min_interval=1.0)
    await w.writer.put("db", b"v")
    await w.refresher.load_all()
    checks = w.store.calls["read_stages"]
    await w.cache.refresh("db", trigger="request", force=True)
    await w.cache.refresh("db", trigger="request", force=True)
    assert w.store.calls["read_stages"] == checks + 1
    w.clock.now += 1.5
    await w.cache.refresh("db", trigger="request", force=True)
    assert w.store.calls["read_stages"] == checks + 2


async def test_an_outage_is_logged_once_when_it_starts_not_per_pass_or_secret(
    caplog: pytest.LogCaptureFixture,
) -> None:
    w = World()
    for i in range(50):
        await w.writer.put(f"s{i}", b"v")
    await w.refresher.load_all()
    w.store.unavailable = True
    with caplog.at_level(logging.WARNING, logger="agent.refresh"):
        delays = [await w.refresher.resync(trigger="poll") for _ in range(3)]
    outage_lines = [r for r in caplog.records if "unavailable" in r.getMessage()]
    assert len(outage_lines) == 1
    assert delays[0] < delays[2]  # backing off
    for i in range(50):
        assert (await w.cache.get(f"s{i}")).stale
    w.store.unavailable = False
    await w.writer.put("s7", b"rotated during the outage")
    assert await w.refresher.resync(trigger="poll") > 1  # back to the normal interval
    assert await w.value("s7") == b"rotated during the outage"
    assert not (await w.cache.get("s7")).stale


async def test_readiness_waits_for_transient_failures_but_not_permanent_ones() -> None:
    w = World()
    await w.writer.put("ok", b"v")
    w.refresher.patterns = ("ok", "missing")
    await w.refresher.load_all()
    assert w.refresher.ready.is_set()  # "missing" failed for good: not found

    w2 = World()
    await w2.writer.put("ok", b"v")
    w2.store.unavailable = True
    await w2.refresher.load_all()
    assert not w2.refresher.ready.is_set()
    w2.store.unavailable = False
    await w2.refresher.resync(trigger="poll")
    assert w2.refresher.ready.is_set()


async def test_concurrent_refreshes_share_one_check() -> None:
    import asyncio

    w = World()
    await w.writer.put("db", b"v")
    await w.refresher.load_all()
    checks = w.store.calls["read_stages"]
    await asyncio.gather(*(w.cache.refresh("db") for _ in range(20)))
    assert w.store.calls["read_stages"] == checks + 1


def test_backoff_doubles_with_jitter_and_caps() -> None:
    import random

    b = Backoff(initial=1, maximum=8, jitter=0.1, rng=random.Random(7))
    delays = [b.next_delay() for _ in range(6)]
    for delay, base in zip(delays, [1, 2, 4, 8, 8, 8], strict=True):
        assert base * 0.9 <= delay <= base * 1.1
    b.reset()
    assert b.next_delay() <= 1.1


def test_backoff_survives_thousands_of_failures_in_a_row() -> None:
    """Regression: 2**failures overflowed a float after ~1,030 failures (a day-long outage)."""
    b = Backoff(initial=1, maximum=60, jitter=0.1)
    delays = [b.next_delay() for _ in range(5000)]
    assert 54 <= delays[-1] <= 66


async def test_a_load_in_flight_when_a_reload_drops_the_secret_does_not_bring_it_back() -> None:
    # Found in CI: a poll pass was loading "keep/a" when SIGHUP narrowed the
    # patterns; the load finished after the reload removed it and put it back.
    import asyncio

    w = World()
    await w.writer.put("keep/a", b"va")
    gate = asyncio.Event()
    read_stages = w.store.read_stages

    async def slow_read_stages(name: str) -> Any:
        await gate.wait()
        return await read_stages(name)

    w.store.read_stages = slow_read_stages  # type: ignore[method-assign]
    load = asyncio.create_task(w.cache.refresh("keep/a"))
    await asyncio.sleep(0.01)
    w.cache.remove("keep/a")  # what Daemon.apply does for a dropped name
    gate.set()
    await load
    assert not w.cache.holds("keep/a")
    # A read after the removal loads it afresh and holds it again.
    assert (await w.cache.get("keep/a")).secret.value.reveal() == b"va"
    assert w.cache.holds("keep/a")


async def test_a_pass_listed_before_a_reload_skips_the_names_it_dropped() -> None:
    w = World()
    await w.writer.put("keep/a", b"va")
    await w.writer.put("new/b", b"vb")
    w.refresher.patterns = ("new/*",)  # the reload ran after the pass listed its names
    await w.refresher._refresh_many(["keep/a", "new/b"], trigger="poll")
    assert w.cache.names() == ["new/b"]
