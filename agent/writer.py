"""The writer side: seal values into new versions and move stages.

Every stage move carries a proof (:mod:`agent.crypto.stageproof`) made with
the DEK of the version it moves to, so a reader can tell our moves from a
store writer's who holds no master key. Every move goes through
:meth:`SecretWriter._move` (``put``, ``promote``, and rotation through
:meth:`SecretWriter.apply_stages`).

A move is built only on a map whose proof the writer checked first: signing
a stage move on top of a hand-edited map would vouch for the labels the
editor set (a rolled-back CURRENT kept while rotation adds PENDING). On a map
without valid proof, ``put`` and ``promote`` of CURRENT start a new map with
that version alone; every other move is refused.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Awaitable, Mapping, Sequence
from dataclasses import dataclass

from agent.crypto import stageproof
from agent.crypto.datakeys import DataKeys
from agent.crypto.envelope import EnvelopeContext, dumps, parse, seal
from agent.deletion import check_label, deletion_of, refuse_deleted
from agent.errors import (
    AgentError,
    BadRequest,
    Conflict,
    DecryptionError,
    SecretNotFound,
    VersionNotFound,
)
from agent.retention import RetentionPolicy, prune_quietly
from agent.stageguard import KeyVersionGone, StageMapRefused, verify_map
from agent.stores.base import (
    BatchReadableStore,
    BulkWritableStore,
    StageState,
    WritableStore,
)
from agent.types import (
    CURRENT,
    PREVIOUS,
    ValueType,
    normalize_stage,
    stages_of,
    utcnow,
    validate_name,
    validate_version_id,
)


@dataclass(frozen=True, slots=True)
class PutResult:
    """What a put did: the new version and the resulting stage map."""

    name: str
    version_id: str
    stages: tuple[str, ...]
    created: bool


def promoted(current: Mapping[str, str], stage: str, version_id: str) -> dict[str, str]:
    """The stage map after moving ``stage`` to ``version_id``.

    Moving CURRENT also moves PREVIOUS to the old CURRENT, as Secrets Manager
    does. A label sits on at most one version, which a map guarantees. A
    purged secret's map (its tombstone) is replaced: the name starts afresh.
    """
    deletion = deletion_of(current)
    new = {} if deletion is not None and deletion.purged else dict(current)
    old = new.get(stage)
    new[stage] = version_id
    if stage == CURRENT and old is not None and old != version_id:
        new[PREVIOUS] = old
    return new


@dataclass(frozen=True, slots=True)
class _Base:
    """The stage map a move is built on, as far as the writer trusts it."""

    state: StageState
    #: The labels a move may keep: the map's own if its proof verified, else none.
    stages: dict[str, str]
    #: The proven sequence of ``state`` (0: no trusted proof).
    sequence: int
    #: Why ``state`` is not trusted (None: it is).
    refused: StageMapRefused | None = None


class SecretWriter:
    """Creates versions and moves stages in one store."""

    def __init__(
        self,
        store: WritableStore,
        datakeys: DataKeys,
        *,
        retention: RetentionPolicy | None = None,
        accept_unproven: bool = False,
    ) -> None:
        self.store = store
        self.datakeys = datakeys
        #: Applied after each put (old unstaged versions pruned); None: keep all.
        self.retention = retention
        #: Build on maps without proof as they stand (``store.accept_unproven_stages``).
        self.accept_unproven = accept_unproven
        #: Seconds to wait before a second look at an unproven map on a store
        #: whose label moves are not atomic (AWS).
        self.settle = 1.0

    async def _trust(self, name: str, state: StageState) -> _Base:
        """Check ``state``'s proof before a move is built on it (see the module docstring)."""
        if not state.stages or getattr(self.store, "plaintext", False):
            return _Base(state, dict(state.stages), 0)
        if state.proof is None and self.accept_unproven:
            return _Base(state, dict(state.stages), 0)
        try:
            proof = await verify_map(self.store, self.datakeys, name, state)
        except StageMapRefused as exc:
            moving = isinstance(exc, KeyVersionGone) or not self._atomic
            if moving:
                # Another writer's move may be under way: the key version pruned
                # after it, or (AWS) its labels moved one call at a time with the
                # proof following. Look again before treating the map as edited.
                if not self._atomic:
                    await asyncio.sleep(self.settle)
                if (await self._state(name)).revision != state.revision:
                    raise Conflict(
                        f"stage map of secret {name!r} changed while its proof was checked"
                    ) from None
            return _Base(state, {}, 0, exc)
        return _Base(state, dict(state.stages), proof.sequence)

    @property
    def _atomic(self) -> bool:
        return bool(getattr(self.store, "stage_moves_atomic", True))

    def _refuse(self, name: str, base: _Base) -> AgentError:
        """The error for a move other than CURRENT on top of an untrusted map."""
        assert base.refused is not None
        message = (
            f"{base.refused.message}; refusing to move stages on top of it. Check it with "
            f"`secrets-agent describe {name}`; `secrets-agent promote {name} CURRENT <id>` "
            "writes a new proven map with that version alone"
        )
        return StageMapRefused(message)

    async def seal(self, name: str, version_id: str, value: bytes, value_type: ValueType) -> bytes:
        """Seal ``value`` as the envelope of ``name``/``version_id`` (no store write)."""
        return (await self._seal(name, version_id, value, value_type))[0]

    async def _seal(
        self, name: str, version_id: str, value: bytes, value_type: ValueType
    ) -> tuple[bytes, bytes]:
        """The envelope and the DEK it was sealed with."""
        dek, wrapped = await self.datakeys.for_write(self.store.store_id)
        context = EnvelopeContext(name, version_id, self.store.store_id)
        env = seal(value, dek=dek, keys=wrapped, context=context, value_type=value_type)
        return dumps(env), dek

    async def _move(
        self,
        name: str,
        base: _Base,
        stages: dict[str, str],
        key_version: str,
        dek: bytes,
        *,
        sets_current: bool,
    ) -> StageState:
        """Compare-and-swap ``stages`` in, with its proof (keyed by ``key_version``'s DEK)."""
        return await self.store.set_stages(
            name,
            stages,
            expected_revision=base.state.revision,
            proof=self._proof(name, base, stages, key_version, dek, sets_current=sets_current),
        )

    def _proof(
        self,
        name: str,
        base: _Base,
        stages: dict[str, str],
        key_version: str,
        dek: bytes,
        *,
        sets_current: bool,
    ) -> str:
        """The proof of ``stages``, built on ``base``.

        The sequence is one more than the base's, and at least the time in
        microseconds, so it keeps growing even if a map lost its proof. An
        unproven map's own sequence is not used: its editor could set it to
        the largest one the format allows. The proof's ``base`` is the base's
        sequence when the move keeps the base's CURRENT (a PENDING or custom
        label added), 0 when the move sets CURRENT itself: an agent refuses a
        kept CURRENT that comes from a map older than the one it serves.
        """
        sequence = max(base.sequence + 1, time.time_ns() // 1000)
        keeps_current = not sets_current and CURRENT in stages
        return stageproof.make(
            dek,
            store_id=self.store.store_id,
            secret=name,
            sequence=sequence,
            key_version=key_version,
            stages=stages,
            base=base.sequence if keeps_current else 0,
        ).encode()

    async def _dek_of(self, name: str, version_id: str) -> bytes:
        """The DEK of an existing version's envelope (to key a stage move to it)."""
        stored = await self.store.read_version(name, version_id)
        env = parse(stored.envelope, where=f"secret {name!r} version {version_id!r}")
        expected = EnvelopeContext(name, version_id, self.store.store_id)
        if env.context != expected:
            raise DecryptionError(
                f"envelope refused: it was written for {env.context.describe()} "
                f"but found at {expected.describe()}"
            )
        return await self.datakeys.unwrap(env.keys, store_id=self.store.store_id)

    async def put(
        self,
        name: str,
        value: bytes,
        *,
        value_type: ValueType = "string",
        stage: str = CURRENT,
        version_id: str | None = None,
        validate_json: bool = False,
    ) -> PutResult:
        """Write a new version and move ``stage`` to it.

        Raises:
            BadRequest: invalid name, stage, or (with ``validate_json``) not JSON.
            Conflict: the stage map moved concurrently; the version was written
                but not staged (run ``promote`` to stage it).
            StageMapRefused: ``stage`` is not CURRENT and the map in the store
                has no valid proof (nothing was written).
            SecretDeleted: the secret is scheduled for deletion (nothing written).
        """
        validate_name(name)
        stage = check_label(normalize_stage(stage))
        if validate_json:
            try:
                json.loads(value)
            except (ValueError, UnicodeDecodeError):
                raise BadRequest(f"the value for {name!r} is not valid JSON") from None
        version_id = validate_version_id(version_id or str(uuid.uuid4()))
        envelope, dek = await self._seal(name, version_id, value, value_type)
        base = await self._trust(name, await self._state(name))
        if base.refused is not None and stage != CURRENT:
            raise self._refuse(name, base)
        refuse_deleted(name, base.stages)
        await self.store.write_version(name, version_id, envelope)
        try:
            new = await self._move(
                name,
                base,
                promoted(base.stages, stage, version_id),
                version_id,
                dek,
                sets_current=stage == CURRENT,
            )
        except Conflict as exc:
            raise Conflict(
                f"version {version_id} of {name!r} was written but not staged: {exc.message}"
            ) from None
        if self.retention is not None:
            await prune_quietly(self.store, name, self.retention, now=utcnow())
        return PutResult(name, version_id, stages_of(new.stages, version_id), True)

    async def put_many(self, items: Sequence[tuple[str, bytes]]) -> list[PutResult | Exception]:
        """:meth:`put` of each (name, text value) at CURRENT, as one batch.

        On a :class:`~agent.stores.base.BulkWritableStore` (the directory
        store) the versions are written in one pass and made durable together,
        then the stage maps, then durable together again: two syncs per batch
        in place of about five per secret, and a stage map never points at a
        version that is not yet on disk. A map that replaces one in service is
        written with its own sync, as :meth:`put` does. Elsewhere, one
        :meth:`put` after another.

        Returns:
            One result per item, in order: its :class:`PutResult`, or the error
            that item met (the others are unaffected).
        """
        store = self.store
        if not isinstance(store, BulkWritableStore):
            return [await _result(self.put(name, value)) for name, value in items]
        results: list[PutResult | Exception | None] = [None] * len(items)
        sealed: list[tuple[int, str, str, bytes, bytes]] = []
        for i, (name, value) in enumerate(items):
            try:
                validate_name(name)
                vid = str(uuid.uuid4())
                envelope, dek = await self._seal(name, vid, value, "string")
            except AgentError as exc:
                results[i] = exc
                continue
            sealed.append((i, name, vid, envelope, dek))
        written = await store.write_versions_many([(n, v, e) for _, n, v, e, _ in sealed])
        await store.sync()
        sealed = [
            item
            for item, err in zip(sealed, written, strict=True)
            if not _failed(item, err, results)
        ]
        states = await self.states_of([name for _, name, _, _, _ in sealed])
        moves = []
        trusted = []
        for item, state in zip(sealed, states, strict=True):
            i, name, vid, _, dek = item
            try:
                base = await self._trust(name, state)
                refuse_deleted(name, base.stages)  # (its version stays unstaged: pruned later)
            except AgentError as exc:
                results[i] = exc
                continue
            stages = promoted(base.stages, CURRENT, vid)
            proof = self._proof(name, base, stages, vid, dek, sets_current=True)
            moves.append((name, stages, state.revision, proof))
            trusted.append((item, state))
        sealed = [item for item, _ in trusted]
        states = [state for _, state in trusted]
        staged = await store.set_stages_many(moves)
        await store.sync()
        for (i, name, vid, _, _), state, new in zip(sealed, states, staged, strict=True):
            if isinstance(new, Exception):
                results[i] = new
                continue
            results[i] = PutResult(name, vid, stages_of(new.stages, vid), True)
            if state.revision and self.retention is not None:
                await prune_quietly(self.store, name, self.retention, now=utcnow())
        return [r if r is not None else AgentError("not written") for r in results]

    async def promote(self, name: str, stage: str, version_id: str) -> StageState:
        """Move ``stage`` of ``name`` to an existing version (one compare-and-swap).

        On a map without valid proof only CURRENT may be moved, and the new
        map holds that version alone: the way back from a refused map.

        Raises:
            VersionNotFound: no such version.
            Conflict: someone else moved the stages first.
            StageMapRefused: ``stage`` is not CURRENT and the map has no valid proof.
        """
        validate_name(name)
        stage = check_label(normalize_stage(stage))
        validate_version_id(version_id)
        base = await self._trust(name, await self._state(name))
        if base.refused is not None and stage != CURRENT:
            raise self._refuse(name, base)
        refuse_deleted(name, base.stages)
        versions = {v for v, _ in await self.store.list_versions(name)}
        if version_id not in versions:
            raise VersionNotFound(f"secret {name!r} has no version {version_id!r}")
        dek = await self._dek_of(name, version_id)
        return await self._move(
            name,
            base,
            promoted(base.stages, stage, version_id),
            version_id,
            dek,
            sets_current=stage == CURRENT,
        )

    async def apply_stages(
        self,
        name: str,
        stages: Mapping[str, str],
        *,
        expected_revision: str,
        lifecycle: bool = False,
    ) -> StageState:
        """Replace the whole stage map of ``name`` in one compare-and-swap.

        Every stage move this writer makes (``put``, ``promote``, rotation's
        PENDING and finish) goes through here, so whatever a stage move must
        carry (e.g. proof that a key holder made it) is added in one place.

        The map is stored with its proof, keyed by the DEK of the version it
        stages at CURRENT (else the first staged version in label order).

        Raises:
            Conflict: the map's revision is no longer ``expected_revision``;
                nothing was written.
            VersionNotFound: a stage points at a version that does not exist.
            DecryptionError: the key version's envelope cannot be opened.
            StageMapRefused: the map in the store has no valid proof, so
                ``stages`` (computed from it) is not moved on top of it.
            SecretDeleted: the secret is scheduled for deletion (only
                ``lifecycle`` moves, :mod:`agent.deletion`'s, may change it).
        """
        state = await self._state(name)
        if state.revision != expected_revision:
            raise Conflict(
                f"stage map of secret {name!r} changed concurrently (expected revision "
                f"{expected_revision!r}, found {state.revision!r}); nothing was written"
            )
        base = await self._trust(name, state)
        if base.refused is not None:
            raise self._refuse(name, base)
        if not lifecycle:
            refuse_deleted(name, base.stages)
        if not stages:
            return await self.store.set_stages(name, stages, expected_revision=expected_revision)
        key_version = stages.get(CURRENT) or stages[min(stages)]
        dek = await self._dek_of(name, key_version)
        sets_current = stages.get(CURRENT) != base.stages.get(CURRENT)
        return await self._move(
            name, base, dict(stages), key_version, dek, sets_current=sets_current
        )

    async def states_of(self, names: Sequence[str]) -> list[StageState]:
        """The stage map of each of ``names`` (empty for a new secret), batched where the
        store reads many per call.

        Raises:
            AgentError: the store could not read one of them.
        """
        store = self.store
        if not isinstance(store, BatchReadableStore):
            return [await self._state(name) for name in names]
        out = []
        for got in await store.read_stages_many(names):
            if isinstance(got, SecretNotFound):
                got = StageState({}, "")
            if isinstance(got, Exception):
                raise got
            out.append(got)
        return out

    async def _state(self, name: str) -> StageState:
        try:
            return await self.store.read_stages(name)
        except SecretNotFound:
            return StageState({}, "")


async def _result(put: Awaitable[PutResult]) -> PutResult | Exception:
    try:
        return await put
    except AgentError as exc:
        return exc


def _failed(
    item: tuple[int, str, str, bytes, bytes],
    err: Exception | None,
    results: list[PutResult | Exception | None],
) -> bool:
    if err is None:
        return False
    results[item[0]] = err
    return True
