"""Keep the cache fresh: push where the store can, polling everywhere, backoff on errors.

One attempt (:meth:`SecretCache.refresh`) is kept apart from the policy here:
a poll loop with jittered intervals, a watch loop restarted with backoff, and
one store-wide backoff while the store is unavailable, so an outage is probed
once per backoff step, not once per secret.

Outage semantics: a broken watch wakes the poll loop at once, and polling
keeps ``refresh.interval`` (not the safety-net ``watch_interval``) until the
watch is back. The first failed check marks every secret it reached stale;
one "store unavailable" line is logged when an outage starts and one
"store available again" line when it ends, the retries in between at debug
level. Malformed store objects and stages naming missing versions are
logged per secret, rate-limited.
"""

from __future__ import annotations

import asyncio
import fnmatch
import logging
import random
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import TypeVar

from agent.aio import wait_event
from agent.cache import SecretCache
from agent.config import RefreshConfig
from agent.errors import (
    AgentError,
    BackendUnavailable,
    MalformedStoreData,
    NotFound,
    VersionNotFound,
)
from agent.metrics import Metrics
from agent.ratelog import RateLimitedLog
from agent.stores.base import BatchReadableStore, SecretStore, WatchableStore

log = logging.getLogger(__name__)
T = TypeVar("T")
#: Refreshes in flight at once against a store that reads one secret per call.
_CONCURRENCY = 16
#: Names per batch against a store that reads many per call (one thread hop each),
#: and batches in flight at once. Between batches the event loop serves reads.
_BATCH = 256
_BATCH_WORKERS = 2
#: Names per marker check (a stat each, in one thread hop).
_MARKER_SLICE = 512
_MATCH_SLICE = 1024


def matches(name: str, patterns: Iterable[str]) -> bool:
    """Whether ``name`` is one of ``patterns`` (names or globs)."""
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


class Backoff:
    """Exponential backoff with jitter: ``initial * 2**n``, capped, times 1 +/- jitter."""

    def __init__(
        self, *, initial: float, maximum: float, jitter: float, rng: random.Random | None = None
    ) -> None:
        self.initial = initial
        self.maximum = maximum
        self.jitter = jitter
        self.failures = 0
        self._rng = rng or random.Random()  # noqa: S311 - jitter, not crypto

    def next_delay(self) -> float:
        """Record a failure and return the delay before the next attempt."""
        # The exponent is capped: 2**1030 overflows a float, which once ended a
        # part after ~1,000 failures in a row (a long outage).
        base = min(self.maximum, self.initial * 2 ** min(self.failures, 64))
        self.failures += 1
        return float(base * self._rng.uniform(1 - self.jitter, 1 + self.jitter))

    def reset(self) -> None:
        self.failures = 0


class Refresher:
    """Loads the configured secrets, then keeps every cached secret fresh."""

    def __init__(
        self,
        cache: SecretCache,
        store: SecretStore,
        *,
        settings: RefreshConfig,
        patterns: Sequence[str],
        metrics: Metrics,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.cache = cache
        self.store = store
        self.settings = settings
        self.patterns = tuple(patterns)
        self.metrics = metrics
        self.clock = clock
        self.ready = asyncio.Event()
        self.watching = False
        self.store_down_since: float | None = None
        self._backoff = Backoff(
            initial=settings.backoff_initial, maximum=settings.backoff_max, jitter=settings.jitter
        )
        self._wake = asyncio.Event()
        self._failed_for_good: dict[str, str] = {}
        self._last_outage: BackendUnavailable | None = None
        self._quiet = RateLimitedLog(log, clock=clock)
        self._noisy: set[str] = set()  # names with a rate-limited problem on record
        # The start-up pass: the poll loop waits for it instead of repeating it.
        self._load_started = False
        self._loaded = asyncio.Event()
        self._load_delay = 0.0

    # ------------------------------------------------------------------ startup

    async def load_all(self, *, trigger: str = "startup") -> None:
        """Load every configured secret (names and globs); set ``ready`` when done.

        A secret that fails for good (not found, refused) is recorded and does
        not hold readiness back; a transient failure does, until it loads.
        This is the one full pass at start-up: the poll loop starts from the
        state it leaves (see :meth:`run`).
        """
        self._load_started = True
        try:
            try:
                names = await self._wanted_names()
            except BackendUnavailable as exc:
                self._load_delay = self._note_outage(exc)
                return
            transient = await self._refresh_many(names, trigger=trigger)
            if transient and self._last_outage is not None:
                self._load_delay = self._note_outage(self._last_outage, affected=len(transient))
            self._check_ready(names)
        finally:
            self._loaded.set()

    async def _wanted_names(self) -> list[str]:
        literal = [p for p in self.patterns if not any(c in p for c in "*?[")]
        if len(literal) == len(self.patterns):
            return sorted(set(literal))
        listed = await self.store.list_names()
        wanted = set(literal)
        for i in range(0, len(listed), _MATCH_SLICE):  # fnmatch: ~3 us a name; yield
            wanted.update(n for n in listed[i : i + _MATCH_SLICE] if matches(n, self.patterns))
            await asyncio.sleep(0)
        return sorted(wanted)

    async def _refresh_many(self, names: Iterable[str], *, trigger: str) -> list[str]:
        """Refresh ``names`` with a few workers over a queue; return those that failed
        transiently.

        Against a :class:`BatchReadableStore`, each worker takes a batch of
        names at a time (two thread hops per batch); whatever a batch cannot
        settle goes through :meth:`SecretCache.refresh` one by one. A
        transient failure is not logged here: :meth:`resync` logs an outage
        once per backoff step, however many secrets it affects.
        """
        transient: list[str] = []

        async def one(name: str) -> None:
            if not self._still_wanted(name):
                return  # a reload dropped it after the names were listed
            try:
                await self.cache.refresh(name, trigger=trigger)
                self._settled(name)
            except MalformedStoreData as exc:
                # The store answered: not an outage, but the operator must hear of it.
                self._noisy.add(name)
                self._quiet.warning((name, exc.code), "secret %r: %s", name, exc.message)
            except BackendUnavailable as exc:
                transient.append(name)
                self._last_outage = exc
            except AgentError as exc:
                self._failed_for_good[name] = exc.message
                self._noisy.add(name)
                if isinstance(exc, VersionNotFound):
                    self._quiet.warning(
                        (name, exc.code),
                        "secret %r: %s; the last good version stays in service",
                        name,
                        exc.message,
                    )
                elif not isinstance(exc, NotFound):
                    self._quiet.warning((name, exc.code), "secret %r: %s", name, exc.message)

        async def batch(names: list[str]) -> None:
            names = [n for n in names if self._still_wanted(n)]
            if not names:
                return
            left = set(await self.cache.refresh_batch(names, trigger=trigger))
            for name in names:
                if name in left:
                    await one(name)
                else:
                    self._settled(name)

        todo = list(names)
        if isinstance(self.store, BatchReadableStore):
            batches = [todo[i : i + _BATCH] for i in range(0, len(todo), _BATCH)]
            await _drain(batches, batch, workers=_BATCH_WORKERS)
        else:
            await _drain(todo, one, workers=_CONCURRENCY)
        return transient

    def _still_wanted(self, name: str) -> bool:
        return self.cache.holds(name) or matches(name, self.patterns)

    def _settled(self, name: str) -> None:
        """``name`` refreshed fine: forget a failure on record, and say so next time."""
        self._failed_for_good.pop(name, None)
        if name in self._noisy:
            self._noisy.discard(name)
            self._quiet.forget_all(lambda key: key[0] == name)  # type: ignore[index]

    def _check_ready(self, names: Sequence[str]) -> None:
        if self.ready.is_set():
            return
        holds = self.cache.holds
        if all(holds(n) or n in self._failed_for_good for n in names):
            log.info(
                "ready: %d secrets loaded, %d failed",
                len(self.cache.held()),
                len(self._failed_for_good),
            )
            self.ready.set()

    # --------------------------------------------------------------------- loops

    async def run(self) -> None:
        """Poll (and watch, where the store can push) until cancelled."""
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self._poll_loop())
            if self.settings.watch and isinstance(self.store, WatchableStore):
                tg.create_task(self._watch_loop(self.store))

    def poke(self) -> None:
        """Wake the poll loop now (config reload, tests)."""
        self._wake.set()

    def _interval(self) -> float:
        base = self.settings.watch_interval if self.watching else self.settings.interval
        j = self.settings.jitter
        return base * random.uniform(1 - j, 1 + j)  # noqa: S311 - jitter

    async def _poll_loop(self) -> None:
        await asyncio.sleep(0)  # a start-up load created alongside has begun by now
        if self._load_started:
            # Start from the state the start-up pass leaves, not with a second pass.
            await self._loaded.wait()
            delay = self._interval() if self.ready.is_set() else self._load_delay
        else:
            delay = 0.0 if not self.ready.is_set() else self._interval()
        while True:
            await wait_event(self._wake, delay)
            self._wake.clear()
            delay = await self.resync(trigger="poll")

    async def resync(self, *, trigger: str) -> float:
        """Check every wanted and held secret once; return the delay until the next pass."""
        try:
            wanted = await self._wanted_names()
        except BackendUnavailable as exc:
            self.cache.mark_unavailable(exc)
            return self._note_outage(exc)
        names = list(set(wanted).union(self.cache.held()))
        if isinstance(self.store, BatchReadableStore):
            # Cheap markers first (a stat each); only what changed is read again.
            changed: list[str] = []
            for i in range(0, len(names), _MARKER_SLICE):
                changed += await self.cache.changed_markers(names[i : i + _MARKER_SLICE])
            names = changed
        transient = await self._refresh_many(names, trigger=trigger)
        self._check_ready(wanted)
        if transient and self._last_outage is not None:
            return self._note_outage(self._last_outage, affected=len(transient))
        self._recovered()
        return self._interval()

    def _note_outage(self, exc: BackendUnavailable, *, affected: int | None = None) -> float:
        """Record one failed pass and return the backoff delay.

        The first failed pass of an outage is logged at WARNING; the retries
        until it ends at DEBUG, so an outage of hours is two lines, not hundreds.
        """
        starting = self.store_down_since is None
        if starting:
            self.store_down_since = self.clock()
        # Probing an outage is never slower than ordinary polling.
        delay = min(self._backoff.next_delay(), self.settings.interval)
        scope = f"{affected} secrets" if affected is not None else "all secrets"
        log.log(
            logging.WARNING if starting else logging.DEBUG,
            "store unavailable (%s): %s served stale from cache where held; retry %d in %.1fs",
            exc.message,
            scope,
            self._backoff.failures,
            delay,
        )
        return delay

    def _recovered(self) -> None:
        if self.store_down_since is not None:
            log.info("store available again after %.1fs", self.clock() - self.store_down_since)
        self.store_down_since = None
        self._backoff.reset()

    async def _watch_loop(self, store: WatchableStore) -> None:
        backoff = Backoff(
            initial=self.settings.backoff_initial,
            maximum=self.settings.backoff_max,
            jitter=self.settings.jitter,
        )
        while True:
            try:
                async for event in store.watch():
                    self.watching = True
                    backoff.reset()
                    self.metrics.watch_events.labels("event").inc()
                    if event.names is None and not self._load_started:
                        # Watching before the start-up pass begins: it sees everything.
                        continue
                    if not self._loaded.is_set() and self._load_started:
                        await self._loaded.wait()
                    await self._on_event(event.names)
            except BackendUnavailable as exc:
                self._quiet.warning(
                    "watch",
                    "store watch broke (%s); polling every %.0fs until it is back",
                    exc.message,
                    self.settings.interval,
                )
            if self.watching:
                # The poll loop sleeps watch_interval while a watch is healthy:
                # wake it, so an outage is noticed (stale, metrics) now, not minutes later.
                self.poke()
            self.watching = False
            self.metrics.watch_events.labels("restart").inc()
            await asyncio.sleep(backoff.next_delay())

    async def _on_event(self, names: frozenset[str] | None) -> None:
        if names is None:
            await self.resync(trigger="watch")
            return
        holds = self.cache.holds
        targets = [n for n in names if holds(n) or matches(n, self.patterns)]
        await self._refresh_many(targets, trigger="watch")


async def _drain(items: Sequence[T], work: Callable[[T], Awaitable[None]], *, workers: int) -> None:
    """``work(item)`` for each item, by at most ``workers`` tasks taking from one queue."""
    queue = iter(items)

    async def worker() -> None:
        for item in queue:
            await work(item)

    async with asyncio.TaskGroup() as tg:
        for _ in range(min(workers, len(items))):
            tg.create_task(worker())
