"""The reader's check of stage-map proofs: no unproven move, no rollback by replay.

A store writer without master keys can point CURRENT at another genuine
version (a rollback to a revoked password) or put back an old stage map.
:class:`StageGuard` sits between the store and the cache: every stage map the
agent reads must carry a valid proof (:mod:`agent.crypto.stageproof`) and a
sequence no lower than the one in service. A map that fails is refused and
the map in service is returned in its place, so the cache sees "unchanged"
and the version in service stays; the refusal is logged (rate-limited),
audited, counted and listed in ``/v1/status``. ``promote NAME CURRENT
<older>`` writes a newer, proven map: an authenticated rollback, served.

Plain mode (``client_side_encryption: false``) has no keys and no proofs:
there, the store's access control (IAM) is the guard.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from agent.crypto import stageproof
from agent.crypto.datakeys import DataKeys
from agent.crypto.envelope import EnvelopeContext, parse
from agent.errors import DecryptionError, NotFound
from agent.metrics import Metrics
from agent.stores.base import SecretStore, StageState, StoredVersion
from agent.types import CURRENT, utcnow

if TYPE_CHECKING:
    from agent.audit import Auditor

log = logging.getLogger(__name__)
_LOG_EVERY = 60.0  # seconds between two log lines about one secret's refused maps


class StageMapRefused(DecryptionError):
    """A stage map without valid proof, or older than the one in service."""


class KeyVersionGone(StageMapRefused):
    """The version keying a map's proof does not exist: refused, unless the map
    moved meanwhile (a writer moved the stages, then pruned that version)."""


@dataclass(slots=True)
class _Accepted:
    state: StageState
    sequence: int


@dataclass(slots=True)
class _Refusal:
    revision: str
    reason: str
    message: str
    since: str
    first_seen: float
    reported: bool = False
    last_log: float = float("-inf")


class StageGuard:
    """Checks each stage map read; hands back the one in service when a map is refused."""

    def __init__(
        self,
        store: SecretStore,
        datakeys: DataKeys,
        *,
        metrics: Metrics,
        accept_unproven: bool = False,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store = store
        self.datakeys = datakeys
        self.metrics = metrics
        self.accept_unproven = accept_unproven
        self.clock = clock
        self.audit: Auditor | None = None
        self._accepted: dict[str, _Accepted] = {}
        self._refused: dict[str, _Refusal] = {}
        self._atomic = bool(getattr(store, "stage_moves_atomic", True))

    @property
    def active(self) -> bool:
        """False for plaintext stores, whose maps carry no proof."""
        return not getattr(self.store, "plaintext", False)

    def proof_key_version(self, state: StageState) -> str | None:
        """The version whose envelope keys ``state``'s proof (None: no readable proof).

        A batched refresh reads that envelope with the others, so the check
        below needs no store read of its own.
        """
        if state.proof is None:
            return None
        try:
            return stageproof.parse(state.proof).key_version
        except stageproof.StageProofError:
            return None

    async def check(
        self,
        name: str,
        state: StageState,
        *,
        key_envelope: StoredVersion | None = None,
        again: bool = True,
    ) -> StageState:
        """The stage map to use for ``name``: ``state`` if proven and not older.

        ``key_envelope``: the proof's key version, already read (batched refresh).

        ``again``: if the proof's key version is gone and the map moved
        meanwhile, check the new map (once) rather than refuse a map no
        longer there.

        Raises:
            StageMapRefused: ``state`` is refused and none is in service yet.
            BackendUnavailable: the store or every key provider is unreachable
                (transient: nothing is decided).
        """
        if not self.active or state.revision == "":
            return state
        held = self._accepted.get(name)
        if held is not None and held.state.revision == state.revision:
            return held.state
        refusal = self._refused.get(name)
        if refusal is not None and refusal.revision == state.revision:
            return self._still_refused(name, state, refusal, held)
        try:
            try:
                proof = await self._verify(name, state, key_envelope)
            except KeyVersionGone:
                fresh = await self.store.read_stages(name)
                if again and fresh.revision != state.revision:
                    return await self.check(name, fresh, again=False)
                raise
            sequence = -1 if proof is None else proof.sequence
            if sequence < 0 and held is not None and held.sequence >= 0:
                raise StageMapRefused(
                    f"stage map of secret {name!r} carries no proof, while the one in "
                    "service had one"
                )
            if held is not None and sequence < held.sequence:
                raise StageMapRefused(
                    f"stage map of secret {name!r} is older than the one in service "
                    f"(sequence {sequence} < {held.sequence}): a replayed map"
                )
            if proof is not None and held is not None and 0 < (proof.base or 0) < held.sequence:
                # A writer added a label on top of a replayed map and kept its
                # CURRENT: the rolled-back one.
                raise StageMapRefused(
                    f"stage map of secret {name!r} keeps CURRENT from an older map than the "
                    f"one in service (base {proof.base} < {held.sequence}): a replayed map, "
                    "moved on"
                )
        except StageMapRefused as exc:
            return self._refuse(name, state, exc, held)
        self._accept(name, state, sequence, held)
        return state

    async def _verify(
        self, name: str, state: StageState, key_envelope: StoredVersion | None = None
    ) -> stageproof.StageProof | None:
        """The valid proof of ``state`` (None: none, accepted while upgrading)."""
        if state.proof is None and self.accept_unproven:
            return None
        return await verify_map(self.store, self.datakeys, name, state, key_envelope)

    def _accept(self, name: str, state: StageState, sequence: int, held: _Accepted | None) -> None:
        if held is not None and held.state.stages.get(CURRENT) != state.stages.get(CURRENT):
            log.info(
                "secret %r: stage map sequence %d accepted (CURRENT %s -> %s)",
                name,
                sequence,
                held.state.stages.get(CURRENT),
                state.stages.get(CURRENT),
            )
        self._accepted[name] = _Accepted(state, sequence)
        if self._refused.pop(name, None) is not None:
            self._gauge()

    def _refuse(
        self, name: str, state: StageState, exc: StageMapRefused, held: _Accepted | None
    ) -> StageState:
        reason = _reason(exc.message)
        refusal = _Refusal(state.revision, reason, exc.message, utcnow().isoformat(), self.clock())
        self._refused[name] = refusal
        # Between two label moves of a non-atomic store (AWS), a map without its
        # proof is expected for a moment: report it only if it is still there later.
        if not self._atomic and reason in ("mismatch", "unproven") and held is not None:
            return held.state
        return self._still_refused(name, state, refusal, held)

    def _still_refused(
        self, name: str, state: StageState, refusal: _Refusal, held: _Accepted | None
    ) -> StageState:
        """Report (once), log (rate-limited), then serve the map in service or raise."""
        if not refusal.reported:
            self._report(name, refusal, state)
        now = self.clock()
        if now - refusal.last_log >= _LOG_EVERY:
            refusal.last_log = now
            serving = held.state.stages.get(CURRENT) if held is not None else None
            log.warning(
                "%s; %s",
                refusal.message,
                f"version {serving} stays in service" if serving else "nothing is served",
            )
        if held is None:
            raise StageMapRefused(refusal.message)
        return held.state

    def _report(self, name: str, refusal: _Refusal, state: StageState) -> None:
        refusal.reported = True
        self.metrics.stage_maps_refused.labels(refusal.reason).inc()
        self._gauge()
        if self.audit is not None:
            self.audit.record(
                "stage_map_refused",
                secret=name,
                version=state.stages.get(CURRENT),
                outcome="refused",
                reason=refusal.message,
            )

    def _gauge(self) -> None:
        self.metrics.stage_maps_held_back.set(sum(1 for r in self._refused.values() if r.reported))

    def status(self) -> dict[str, Any]:
        """``stage_maps_refused`` for ``/v1/status``: per secret, why and since when."""
        out = []
        for name, r in sorted(self._refused.items()):
            if not r.reported:
                continue
            held = self._accepted.get(name)
            out.append(
                {
                    "secret": name,
                    "reason": r.reason,
                    "message": r.message,
                    "since": r.since,
                    "serving_version": held.state.stages.get(CURRENT) if held else None,
                    "serving_sequence": held.sequence if held else None,
                }
            )
        return {"stage_maps_refused": out}


async def verify_map(
    store: SecretStore,
    datakeys: DataKeys,
    name: str,
    state: StageState,
    key_envelope: StoredVersion | None = None,
) -> stageproof.StageProof:
    """The proof of ``state``, checked: keyed by a version it stages, of this secret and
    store, and matching the whole map.

    Args:
        key_envelope: the proof's key version, already read (batched refresh).

    Raises:
        StageMapRefused: no proof, or one that does not verify.
        BackendUnavailable: the store or every key provider is unreachable.
    """
    if state.proof is None:
        raise StageMapRefused(
            f"stage map of secret {name!r} carries no proof (edited by hand, or written "
            "before proofs existed: run `secrets-agent promote NAME CURRENT <id>` to sign it, "
            "or set store.accept_unproven_stages: true while upgrading)"
        )
    try:
        proof = stageproof.parse(state.proof)
    except stageproof.StageProofError as exc:
        raise StageMapRefused(f"stage map of secret {name!r}: {exc}") from None
    if proof.key_version not in state.stages.values():
        raise StageMapRefused(
            f"stage map of secret {name!r}: its proof is keyed by a version it does not stage"
        )
    dek = await _dek(store, datakeys, name, proof.key_version, key_envelope)
    if not stageproof.verify(dek, proof, store_id=store.store_id, secret=name, stages=state.stages):
        raise StageMapRefused(
            f"stage map of secret {name!r} does not match its proof (edited, or copied "
            "from another secret or store)"
        )
    return proof


async def _dek(
    store: SecretStore,
    datakeys: DataKeys,
    name: str,
    version_id: str,
    stored: StoredVersion | None,
) -> bytes:
    try:
        if stored is None:
            stored = await store.read_version(name, version_id)
    except NotFound:
        raise KeyVersionGone(
            f"stage map of secret {name!r}: its proof's key version {version_id!r} does not exist"
        ) from None
    expected = EnvelopeContext(name, version_id, store.store_id)
    try:
        env = parse(stored.envelope, where=expected.describe())
        if env.context != expected:
            raise DecryptionError("misplaced envelope")
        return await datakeys.unwrap(env.keys, store_id=store.store_id)
    except DecryptionError as exc:
        raise StageMapRefused(
            f"stage map of secret {name!r}: the key of its proof cannot be opened ({exc.message})"
        ) from None


def _reason(message: str) -> str:
    """A bounded metric label for a refusal."""
    if "no proof" in message:
        return "unproven"
    if "older than" in message or "older map" in message:
        return "replayed"
    if "does not match" in message:
        return "mismatch"
    return "invalid"
