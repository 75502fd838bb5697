"""Fetch, unwrap and open one secret version: a single attempt, no retry, no cache."""

from __future__ import annotations

import hashlib
from datetime import datetime

from agent.crypto.datakeys import DataKeys
from agent.crypto.envelope import EnvelopeContext, open_envelope, parse
from agent.deletion import deletion_of, not_found
from agent.errors import (
    BackendUnavailable,
    DecryptionError,
    KeyRevoked,
    NotFound,
    UnsupportedEnvelope,
)
from agent.metrics import Metrics
from agent.stageguard import StageGuard
from agent.stores.base import SecretStore, StageState
from agent.types import Secret, SecretValue, ValueType


def refusal_reason(exc: DecryptionError) -> str:
    """A bounded label for why an envelope was refused."""
    if isinstance(exc, UnsupportedEnvelope):
        return "unsupported"
    if isinstance(exc, KeyRevoked):
        return "key_revoked"
    text = exc.message
    if "found at" in text:
        return "misplaced"
    if "malformed" in text:
        return "malformed"
    if "commitment" in text:
        return "commitment"
    if "authentication failed" in text:
        return "tampered"
    return "key"


class Resolver:
    """Turns (name, version id) into a decrypted :class:`Secret`."""

    def __init__(
        self,
        store: SecretStore,
        datakeys: DataKeys,
        *,
        metrics: Metrics,
        guard: StageGuard | None = None,
    ) -> None:
        self.store = store
        self.datakeys = datakeys
        self.metrics = metrics
        #: Checks each stage map's proof; None trusts the store (tests, plain mode).
        self.guard = guard
        self._decrypted_ok = metrics.decrypts.labels("ok")  # bound once: per-secret path

    async def stages(self, name: str) -> StageState:
        """The cheap version check: the stage map and its revision.

        With a guard, a map without valid proof or older than the one in
        service is refused and the one in service returned instead.

        Raises:
            StageMapRefused: refused, and none is in service yet.
            SecretNotFound: no such secret, or it is deleted (:mod:`agent.deletion`).
        """
        state = await self.store.read_stages(name)
        if self.guard is not None:
            state = await self.guard.check(name, state)
        deletion = deletion_of(state.stages)
        if deletion is not None:
            raise not_found(name, deletion)
        return state

    async def fetch(self, name: str, version_id: str, *, stages: tuple[str, ...] = ()) -> Secret:
        """Read one version from the store and decrypt it.

        Raises:
            NotFound: no such secret or version.
            BackendUnavailable: the store or every key provider is unreachable.
            DecryptionError: the envelope is malformed, misplaced or tampered.
        """
        try:
            stored = await self.store.read_version(name, version_id)
        except NotFound:
            self.metrics.fetches.labels("not_found").inc()
            raise
        except BackendUnavailable:
            self.metrics.fetches.labels("unavailable").inc()
            raise
        self.metrics.fetches.labels("ok").inc()
        return await self.open(name, version_id, stored.envelope, stored.created_at, stages)

    async def open(
        self,
        name: str,
        version_id: str,
        envelope: bytes,
        created_at: object,
        stages: tuple[str, ...] = (),
    ) -> Secret:
        """Decrypt an envelope already read from the store (see :meth:`fetch`)."""
        assert isinstance(created_at, datetime)
        if getattr(self.store, "plaintext", False):
            return self._plain(name, version_id, envelope, created_at, stages)
        expected = EnvelopeContext(name, version_id, self.store.store_id)
        try:
            env = parse(envelope, where=expected.describe())
            if env.context != expected:
                raise DecryptionError(
                    f"envelope refused: it was written for {env.context.describe()} "
                    f"but found at {expected.describe()}"
                )
            dek = await self.datakeys.unwrap(env.keys, store_id=self.store.store_id)
            plaintext = open_envelope(env, dek=dek, expected=expected)
        except DecryptionError as exc:
            self.metrics.decrypts.labels("refused").inc()
            self.metrics.envelopes_refused.labels(refusal_reason(exc)).inc()
            raise
        self._decrypted_ok.inc()
        return Secret(
            name=name,
            version_id=version_id,
            created_at=created_at,
            value=SecretValue(plaintext),
            value_type=env.value_type,
            stages=stages,
            recipients=tuple((k.provider, k.key) for k in env.keys),
        )

    def _plain(
        self,
        name: str,
        version_id: str,
        stored: bytes,
        created_at: datetime,
        stages: tuple[str, ...],
    ) -> Secret:
        """A value from a store that holds plaintext (``client_side_encryption: false``).

        Such stores prefix the value with one byte: 0 for text, 1 for binary.
        """
        value_type: ValueType = "binary" if stored[:1] == b"\x01" else "string"
        self.metrics.decrypts.labels("plaintext").inc()
        return Secret(
            name=name,
            version_id=version_id,
            created_at=created_at,
            value=SecretValue(stored[1:]),
            value_type=value_type,
            stages=stages,
        )


def envelope_digest(envelope: bytes) -> str:
    """A short digest identifying an envelope's bytes (to skip re-opening a refused one)."""
    return hashlib.sha256(envelope).hexdigest()
