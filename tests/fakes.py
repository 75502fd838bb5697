"""Fakes that satisfy the agent's Protocols, for unit tests only."""

from __future__ import annotations

import asyncio
import collections
import itertools
import os
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from agent.crypto.envelope import WrappedKey, canonical_json
from agent.errors import (
    BackendUnavailable,
    BadRequest,
    Conflict,
    DecryptionError,
    SecretNotFound,
    VersionNotFound,
)
from agent.stores.base import StageState, StoredVersion, WatchEvent
from agent.types import normalize_stage, utcnow, validate_name, validate_version_id

# --------------------------------------------------------------------------- stores


@dataclass
class _MemorySecret:
    versions: dict[str, tuple[bytes, datetime]] = field(default_factory=dict)
    stages: dict[str, str] = field(default_factory=dict)
    revision: str = ""
    proof: str | None = None


@dataclass
class _MemoryBackend:
    """The data behind one or more MemoryStore instances (like one directory or etcd)."""

    secrets: dict[str, _MemorySecret] = field(default_factory=dict)
    watchers: list[asyncio.Queue[frozenset[str]]] = field(default_factory=list)
    revisions: itertools.count[int] = field(default_factory=lambda: itertools.count(1))
    unavailable: bool = False


class MemoryStore:
    """A WritableStore and WatchableStore in memory; passes the store contract suite.

    Extras for tests: ``unavailable = True`` makes every call (and open watches)
    raise BackendUnavailable, as a store outage would; :meth:`delete` removes a
    secret as an operator would; :meth:`twin` is a second client of the same
    data (another agent on the same store); ``calls`` counts calls by method.
    """

    def __init__(self, store_id: str = "default", *, backend: _MemoryBackend | None = None):
        self.store_id = store_id
        self._backend = backend if backend is not None else _MemoryBackend()
        self.calls: collections.Counter[str] = collections.Counter()
        self.closed = False

    def twin(self) -> MemoryStore:
        """Another store instance over the same data."""
        return MemoryStore(self.store_id, backend=self._backend)

    @property
    def unavailable(self) -> bool:
        return self._backend.unavailable

    @unavailable.setter
    def unavailable(self, value: bool) -> None:
        self._backend.unavailable = value
        if value:
            self._notify(frozenset())  # wakes open watches so they fail

    def _enter(self, operation: str) -> None:
        self.calls[operation] += 1
        if self._backend.unavailable:
            raise BackendUnavailable(f"memory store {self.store_id!r} is unavailable (test)")

    def _secret(self, name: str) -> _MemorySecret:
        validate_name(name)
        try:
            return self._backend.secrets[name]
        except KeyError:
            raise SecretNotFound(f"secret {name!r} does not exist") from None

    def _notify(self, names: frozenset[str]) -> None:
        for queue in self._backend.watchers:
            queue.put_nowait(names)

    async def list_names(self) -> list[str]:
        self._enter("list_names")
        return sorted(self._backend.secrets)

    async def read_stages(self, name: str) -> StageState:
        validate_name(name)
        self._enter("read_stages")
        secret = self._secret(name)
        return StageState(dict(secret.stages), secret.revision, secret.proof)

    async def read_version(self, name: str, version_id: str) -> StoredVersion:
        validate_name(name)
        validate_version_id(version_id)
        self._enter("read_version")
        try:
            envelope, created_at = self._secret(name).versions[version_id]
        except KeyError:
            raise VersionNotFound(f"version {version_id!r} of {name!r} does not exist") from None
        return StoredVersion(name, version_id, envelope, created_at)

    async def list_versions(self, name: str) -> list[tuple[str, datetime]]:
        validate_name(name)
        self._enter("list_versions")
        return [(v, created) for v, (_, created) in self._secret(name).versions.items()]

    async def write_version(self, name: str, version_id: str, envelope: bytes) -> None:
        validate_name(name)
        validate_version_id(version_id)
        self._enter("write_version")
        secret = self._backend.secrets.setdefault(name, _MemorySecret())
        if version_id in secret.versions:
            raise Conflict(f"version {version_id!r} of {name!r} already exists")
        secret.versions[version_id] = (bytes(envelope), utcnow())
        self._notify(frozenset({name}))

    async def replace_envelope(
        self, name: str, version_id: str, envelope: bytes, *, expected: bytes
    ) -> None:
        validate_name(name)
        validate_version_id(version_id)
        self._enter("replace_envelope")
        versions = self._secret(name).versions
        if version_id not in versions:
            raise VersionNotFound(f"version {version_id!r} of {name!r} does not exist")
        current, created_at = versions[version_id]
        if current != expected:
            raise Conflict(f"the envelope of version {version_id!r} of {name!r} changed")
        versions[version_id] = (bytes(envelope), created_at)
        self._notify(frozenset({name}))

    async def set_stages(
        self,
        name: str,
        stages: Mapping[str, str],
        *,
        expected_revision: str,
        proof: str | None = None,
    ) -> StageState:
        validate_name(name)
        for stage, version_id in stages.items():
            if normalize_stage(stage) != stage:
                raise BadRequest(f"stage label {stage!r} is not normalised")
            validate_version_id(version_id)
        self._enter("set_stages")
        secret = self._secret(name)
        if secret.revision != expected_revision:
            raise Conflict(
                f"stage map of secret {name!r} changed concurrently (expected revision "
                f"{expected_revision!r}, found {secret.revision!r}); nothing was written"
            )
        missing = sorted(set(stages.values()) - set(secret.versions))
        if missing:
            raise VersionNotFound(f"secret {name!r} has no version {missing[0]!r}")
        secret.stages = dict(stages)
        secret.proof = proof
        secret.revision = f"r{next(self._backend.revisions)}"
        self._notify(frozenset({name}))
        return StageState(dict(secret.stages), secret.revision, proof)

    async def delete_version(self, name: str, version_id: str) -> None:
        validate_name(name)
        validate_version_id(version_id)
        self._enter("delete_version")
        secret = self._secret(name)
        if version_id not in secret.versions:
            raise VersionNotFound(f"secret {name!r} has no version {version_id!r}")
        if version_id in secret.stages.values():
            raise Conflict(f"version {version_id!r} of secret {name!r} is staged; not deleted")
        del secret.versions[version_id]
        self._notify(frozenset({name}))

    def delete(self, name: str) -> None:
        """Remove a secret and all its versions (test helper; not part of the Protocol)."""
        del self._backend.secrets[name]
        self._notify(frozenset({name}))

    async def watch(self) -> AsyncIterator[WatchEvent]:
        self._enter("watch")
        queue: asyncio.Queue[frozenset[str]] = asyncio.Queue()
        self._backend.watchers.append(queue)
        try:
            yield WatchEvent(None)
            while True:
                names = await queue.get()
                while not queue.empty():
                    names |= queue.get_nowait()
                if self._backend.unavailable:
                    raise BackendUnavailable(f"memory store {self.store_id!r} watch broke (test)")
                if names:
                    yield WatchEvent(names)
        finally:
            self._backend.watchers.remove(queue)

    async def aclose(self) -> None:
        self.closed = True


# --------------------------------------------------------------------------- key providers


class FakeKeyProvider:
    """A KeyProvider that wraps with AES-256-GCM under a key held in memory.

    Extras for tests: ``calls`` counts ``wrap``/``unwrap`` calls, failed ones
    too; ``error`` (e.g. KeyUnavailable, KeyRevoked) is raised by every call
    while set; while ``gate`` is an unset asyncio.Event every call waits on it,
    and ``entered`` is set once a call has started; ``unwrapped`` keeps every
    buffer ``unwrap`` returned, so a test can check it was wiped.
    """

    def __init__(self, name: str = "fake", *, key: str = "master") -> None:
        self.name = name
        self.key = key
        self._kek = AESGCM(AESGCM.generate_key(bit_length=256))
        self.calls: collections.Counter[str] = collections.Counter()
        self.error: Exception | None = None
        self.gate: asyncio.Event | None = None
        self.entered = asyncio.Event()
        self.unwrapped: list[bytearray] = []
        self.closed = False

    async def _call(self, operation: str) -> None:
        self.calls[operation] += 1
        self.entered.set()
        if self.gate is not None:
            await self.gate.wait()
        if self.error is not None:
            raise self.error

    async def wrap(self, dek: bytes, *, context: Mapping[str, str]) -> WrappedKey:
        await self._call("wrap")
        nonce = os.urandom(12)
        sealed = self._kek.encrypt(nonce, bytes(dek), canonical_json(dict(context)))
        return WrappedKey(self.name, self.key, nonce + sealed)

    async def unwrap(self, wrapped: WrappedKey, *, context: Mapping[str, str]) -> bytearray:
        await self._call("unwrap")
        blob = wrapped.wrapped
        try:
            if (wrapped.provider, wrapped.key) != (self.name, self.key):
                raise InvalidTag
            dek = bytearray(self._kek.decrypt(blob[:12], blob[12:], canonical_json(dict(context))))
        except (InvalidTag, ValueError):
            raise DecryptionError(f"fake provider {self.name!r}: wrapped key refused") from None
        self.unwrapped.append(dek)
        return dek

    async def aclose(self) -> None:
        self.closed = True
