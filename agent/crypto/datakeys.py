"""Data keys: reuse on the write side, a bounded cache of unwrapped keys on the read side.

Every key-provider call costs a round trip to a KMS or an HSM, so:

* **Write side.** One DEK per store id is reused for up to ``max_messages``
  envelopes or ``max_age`` seconds, like the AWS Encryption SDK's caching CMM.
  Reuse is safe because each envelope derives its own payload key from the DEK
  and a random message id (see :mod:`agent.crypto.envelope`).
* **Read side.** Unwrapped DEKs are cached under (provider, key, store id,
  sha256 of the wrapped blob), bounded by ``cache_capacity`` (LRU), ``max_age``
  and ``max_uses`` (hits per unwrap). Concurrent misses for one envelope's
  recipients share one provider call. The store id is part of the cache key
  because each wrap binds it as context: a hit must not skip a context check
  the provider would have made.

DEKs are held in ``bytearray`` buffers that are overwritten with zeros when
evicted, expired, exhausted, dropped or closed (best effort: copies handed to
callers as ``bytes`` cannot be wiped).
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import os
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from agent.config import DataKeysConfig
from agent.crypto.envelope import DEK_SIZE, WrappedKey, wrap_context
from agent.errors import BackendUnavailable, DecryptionError, KeyRevoked, KeyUnavailable
from agent.keys.base import KeyProvider
from agent.metrics import Metrics

#: (provider, key, store id, sha256 of the wrapped blob)
_CacheKey = tuple[str, str, str, bytes]
_Candidate = tuple[WrappedKey, _CacheKey]


def _wipe(buf: bytearray) -> None:
    """Overwrite a key buffer in place."""
    buf[:] = bytes(len(buf))


@dataclass(eq=False, slots=True)
class _Entry:
    dek: bytearray
    created: float
    uses: int = 0


@dataclass(eq=False, slots=True)
class _WriteKey:
    dek: bytearray
    wrapped: tuple[WrappedKey, ...]
    created: float
    messages: int = 0


class DataKeys:
    """Hands out DEKs for writing and unwraps (and caches) DEKs for reading.

    Args:
        providers: the configured key providers by name; their order is the
            order in which an envelope's recipients are tried.
        write_keys: the providers that wrap every new DEK, in envelope order.
        clock: a monotonic clock in seconds (tests pass a fake one).

    The caller owns the providers and closes them; :meth:`aclose` only wipes keys.
    """

    def __init__(
        self,
        providers: Mapping[str, KeyProvider],
        *,
        write_keys: Sequence[str],
        settings: DataKeysConfig,
        metrics: Metrics,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        unknown = [name for name in write_keys if name not in providers]
        # No providers at all is a plaintext store (client_side_encryption: false):
        # nothing is ever wrapped, and for_write says so.
        if providers and (unknown or not write_keys):
            raise ValueError(f"write_keys must name configured key providers, got {unknown}")
        self._providers = dict(providers)
        self._write_keys = tuple(write_keys)
        self._settings = settings
        self._metrics = metrics
        self._cache_hit = metrics.datakey_cache.labels("hit")  # bound once: per-read path
        self._clock = clock
        self._cache: OrderedDict[_CacheKey, _Entry] = OrderedDict()
        self._flights: dict[tuple[_CacheKey, ...], asyncio.Task[bytes]] = {}
        self._writing: dict[str, _WriteKey] = {}
        self._write_locks: dict[str, asyncio.Lock] = {}
        #: (provider, key) -> when it was first seen revoked (monotonic clock).
        self._revoked: dict[tuple[str, str], float] = {}

    # ------------------------------------------------------------------ write side

    async def for_write(self, store_id: str) -> tuple[bytes, tuple[WrappedKey, ...]]:
        """A DEK for a new envelope in ``store_id`` and its wrapped forms.

        Raises:
            KeyUnavailable, KeyRevoked, DecryptionError: a write provider failed
                to wrap a new DEK (nothing is kept; the next call tries again).
        """
        if not self._write_keys:
            raise KeyUnavailable("no key provider is configured (keys: {}): nothing can be written")
        lock = self._write_locks.setdefault(store_id, asyncio.Lock())
        async with lock:  # concurrent writers share one generation
            current = self._writing.get(store_id)
            if current is None or self._spent(current):
                if current is not None:
                    del self._writing[store_id]
                    _wipe(current.dek)
                current = self._writing[store_id] = await self._generate(store_id)
            current.messages += 1
            return bytes(current.dek), current.wrapped

    def retire_write_keys(self) -> None:
        """Stop reusing the current write-side DEKs: the next write wraps a new one.

        Called after a master-key rotation, so new envelopes use the new key
        version at once rather than after ``max_messages`` or ``max_age``.
        """
        for current in self._writing.values():
            _wipe(current.dek)
        self._writing.clear()

    def _spent(self, current: _WriteKey) -> bool:
        return current.messages >= self._settings.max_messages or self._expired(current.created)

    async def _generate(self, store_id: str) -> _WriteKey:
        dek = bytearray(os.urandom(DEK_SIZE))
        context = wrap_context(store_id)
        try:
            wrapped = [
                await self._providers[name].wrap(bytes(dek), context=context)
                for name in self._write_keys
            ]
        except BaseException:
            _wipe(dek)
            raise
        self._metrics.datakeys_generated.inc()
        now = self._clock()
        for key in wrapped:  # so reading back what was just written costs no unwrap
            self._insert(_cache_key(key, store_id), bytearray(dek), now)
        return _WriteKey(dek, tuple(wrapped), now)

    # ------------------------------------------------------------------ read side

    async def unwrap(self, keys: Sequence[WrappedKey], *, store_id: str) -> bytes:
        """The DEK of an envelope with recipients ``keys``, from the cache or a provider.

        Raises:
            KeyUnavailable: no recipient could be unwrapped and at least one
                provider failed transiently (the caller may serve stale data).
            KeyRevoked: every recipient tried is revoked.
            DecryptionError: no configured provider is a recipient, or every
                one refused; the message names each provider and why.
        """
        candidates = self._candidates(keys, store_id)
        if not candidates:
            listed = ", ".join(f"{k.provider}/{k.key}" for k in keys)
            raise DecryptionError(
                f"no configured key provider can open this envelope (recipients: {listed})"
            )
        for _, cache_key in candidates:
            dek = self._lookup(cache_key)
            if dek is not None:
                self._cache_hit.inc()
                return dek
        self._metrics.datakey_cache.labels("miss").inc()
        flight_key = tuple(cache_key for _, cache_key in candidates)
        task = self._flights.get(flight_key)
        if task is None or task.done():
            task = asyncio.create_task(self._unwrap_any(candidates, store_id))
            self._flights[flight_key] = task
            task.add_done_callback(functools.partial(self._landed, flight_key))
        # shield: a cancelled waiter must not cancel the unwrap the others wait for.
        return await asyncio.shield(task)

    def _candidates(self, keys: Sequence[WrappedKey], store_id: str) -> list[_Candidate]:
        seen: dict[_CacheKey, WrappedKey] = {}
        for name in self._providers:
            for key in keys:
                if key.provider == name:
                    seen.setdefault(_cache_key(key, store_id), key)
        return [(key, cache_key) for cache_key, key in seen.items()]

    def _landed(self, flight_key: tuple[_CacheKey, ...], task: asyncio.Task[bytes]) -> None:
        if self._flights.get(flight_key) is task:
            del self._flights[flight_key]
        if not task.cancelled():
            task.exception()  # retrieved, even if every waiter was cancelled

    async def _unwrap_any(self, candidates: list[_Candidate], store_id: str) -> bytes:
        """One attempt per recipient, in the configured providers' order."""
        context = wrap_context(store_id)
        failures: list[tuple[WrappedKey, DecryptionError | BackendUnavailable]] = []
        for key, cache_key in candidates:
            try:
                dek = await self._providers[key.provider].unwrap(key, context=context)
                if len(dek) != DEK_SIZE:
                    _wipe(dek)
                    raise DecryptionError("the unwrapped data key has the wrong size")
            except KeyRevoked as exc:
                self.drop(key.provider, key=key.key)
                self.mark_revoked(key.provider, key.key)
                failures.append((key, exc))
            except (DecryptionError, BackendUnavailable) as exc:
                failures.append((key, exc))
            else:
                self._revoked.pop((key.provider, key.key), None)
                self._metrics.key_unwrap_answered.labels(key.provider).inc()
                answer = bytes(dek)
                self._insert(cache_key, dek, self._clock())
                return answer
        raise _failure(failures)

    def _lookup(self, cache_key: _CacheKey) -> bytes | None:
        entry = self._cache.get(cache_key)
        if entry is None:
            return None
        if self._expired(entry.created):
            self._remove(cache_key, "expired")
            return None
        if entry.uses >= self._settings.max_uses:
            self._remove(cache_key, "exhausted")
            return None
        entry.uses += 1
        self._cache.move_to_end(cache_key)
        return bytes(entry.dek)

    # ------------------------------------------------------------------ housekeeping

    def mark_revoked(self, provider: str, key: str) -> None:
        """Record that ``provider``'s master key ``key`` is disabled, deleted or denied."""
        self._revoked.setdefault((provider, key), self._clock())

    def mark_usable(self, provider: str, key: str) -> None:
        """The key works again (re-enabled): forget the revocation."""
        self._revoked.pop((provider, key), None)

    @property
    def any_revoked(self) -> bool:
        """Whether any master key is marked revoked (the read path's fast check)."""
        return bool(self._revoked)

    def revoked_for(self, provider: str, key: str) -> float | None:
        """Seconds since ``key`` was seen revoked, or None if it is not."""
        since = self._revoked.get((provider, key))
        return None if since is None else self._clock() - since

    @property
    def max_age(self) -> float:
        return self._settings.max_age

    def configured(self, provider: str) -> bool:
        return provider in self._providers

    def revoked_past_max_age(self, recipients: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
        """The configured ``recipients`` if every one was revoked over ``max_age`` ago, else [].

        A value stops being served then: its data key could stay cached no longer.
        """
        if not self._revoked:
            return []
        mine = [(p, k) for p, k in recipients if p in self._providers]
        for p, k in mine:
            age = self.revoked_for(p, k)
            if age is None or age < self._settings.max_age:
                return []
        return mine

    def drop(self, provider: str, *, key: str | None = None) -> None:
        """Forget every DEK wrapped by ``provider`` (and ``key``, if given), e.g. on revocation."""

        def matches(k: WrappedKey | _CacheKey) -> bool:
            name, key_name = (k.provider, k.key) if isinstance(k, WrappedKey) else k[:2]
            return name == provider and key in (None, key_name)

        for cache_key in [c for c in self._cache if matches(c)]:
            self._remove(cache_key, "dropped")
        for store_id, current in list(self._writing.items()):
            if any(matches(w) for w in current.wrapped):
                del self._writing[store_id]
                _wipe(current.dek)

    def prune(self) -> None:
        """Wipe every DEK older than ``max_age`` (also done on each insert)."""
        for cache_key in [c for c, e in self._cache.items() if self._expired(e.created)]:
            self._remove(cache_key, "expired")
        for store_id, current in list(self._writing.items()):
            if self._expired(current.created):
                del self._writing[store_id]
                _wipe(current.dek)

    async def aclose(self) -> None:
        """Stop in-flight unwraps and wipe every DEK held."""
        flights = list(self._flights.values())
        self._flights.clear()
        for task in flights:
            task.cancel()
        await asyncio.gather(*flights, return_exceptions=True)
        for entry in self._cache.values():
            _wipe(entry.dek)
        for current in self._writing.values():
            _wipe(current.dek)
        self._cache.clear()
        self._writing.clear()
        self._metrics.datakey_cache_size.set(0)

    def _insert(self, cache_key: _CacheKey, dek: bytearray, now: float) -> None:
        old = self._cache.pop(cache_key, None)
        if old is not None:
            _wipe(old.dek)
        self._cache[cache_key] = _Entry(dek, now)
        self.prune()
        while len(self._cache) > self._settings.cache_capacity:
            self._remove(next(iter(self._cache)), "evicted")  # least recently used first
        self._metrics.datakey_cache_size.set(len(self._cache))

    def _remove(self, cache_key: _CacheKey, event: str) -> None:
        _wipe(self._cache.pop(cache_key).dek)
        self._metrics.datakey_cache.labels(event).inc()
        self._metrics.datakey_cache_size.set(len(self._cache))

    def _expired(self, created: float) -> bool:
        return self._clock() - created >= self._settings.max_age


def _cache_key(key: WrappedKey, store_id: str) -> _CacheKey:
    return (key.provider, key.key, store_id, hashlib.sha256(key.wrapped).digest())


def _failure(failures: list[tuple[WrappedKey, DecryptionError | BackendUnavailable]]) -> Exception:
    """The error for an envelope no recipient could open: transient wins, then revoked."""
    detail = "; ".join(f"{k.provider}/{k.key}: {exc.message}" for k, exc in failures)
    message = f"could not unwrap the data key ({detail})"
    transient = [exc for _, exc in failures if isinstance(exc, BackendUnavailable)]
    if transient:
        return KeyUnavailable(message, retry_after=max(exc.retry_after for exc in transient))
    revoked = [k for k, exc in failures if isinstance(exc, KeyRevoked)]
    if len(revoked) == len(failures):
        return KeyRevoked(message, provider=revoked[0].provider, key=revoked[0].key)
    return DecryptionError(message)
