"""Batched refresh for stores that read many secrets per call (the file store).

Two store calls per batch (stage maps, then envelopes), then decrypts on the
event loop with the cached data keys; whatever a batch cannot settle plainly
goes back to :meth:`SecretCache.refresh`, one by one, for its exact error
semantics. Split from :mod:`agent.cache`, whose state these functions share.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

from agent.cache_entry import CURRENT_ONLY, Entry, restaged
from agent.deletion import is_deleted
from agent.errors import AgentError
from agent.stores.base import BatchReadableStore, StageState, StoredVersion
from agent.types import Secret, stages_of

if TYPE_CHECKING:
    from agent.cache import SecretCache
    from agent.stageguard import StageGuard


async def refresh_batch(cache: SecretCache, names: Sequence[str], *, trigger: str) -> list[str]:
    """Refresh ``names`` with two store calls (stage maps, then envelopes).

    For a :class:`~agent.stores.base.BatchReadableStore`. Every name the
    batch cannot settle plainly (an error of any kind, a refused or
    vanished version) is returned, for :meth:`refresh` to do one by one
    with its exact error semantics; so is nothing else. A name that
    another refresh changed while the batch was reading is left alone.

    Returns:
        The names left for :meth:`refresh`.
    """
    store = cache.resolver.store
    assert isinstance(store, BatchReadableStore)
    seen = [cache._entries.get(n) for n in names]
    removed = [cache._removed.get(n) for n in names]
    seen_states = [e.state if e is not None else None for e in seen]
    states = await store.read_stages_many(names)
    left: list[str] = []
    todo: list[tuple[int, StageState, list[str]]] = []
    # name index -> the version keying its map's proof (read with the others)
    proof_keys: dict[int, str] = {}
    guard = cache.resolver.guard if cache.resolver.guard and cache.resolver.guard.active else None
    unchanged = 0
    for i, (name, state) in enumerate(zip(names, states, strict=True)):
        entry = seen[i]
        if not isinstance(state, StageState):
            left.append(name)
        elif entry is not None and state.revision == entry.state.revision:
            if entry.state is seen_states[i]:
                entry.state = state  # the same map, with the marker it has now
            entry.missing_since = None
            cache._confirmed(entry)
            unchanged += 1
        elif is_deleted(state.stages):
            left.append(name)  # refresh() reads it as deleted, with the grace period
        else:
            if guard is not None and state.revision != "":
                key_version = guard.proof_key_version(state)
                if key_version is None:
                    left.append(name)  # no readable proof: refused one by one
                    continue
                proof_keys[i] = key_version
            wanted = entry.wanted if entry is not None else CURRENT_ONLY
            held = entry.versions if entry is not None else {}
            vids = sorted({v for st, v in state.stages.items() if st in wanted and v not in held})
            todo.append((i, state, vids))
    if unchanged:
        cache.metrics.version_checks.labels("unchanged").inc(unchanged)
        cache.metrics.refreshes.labels(trigger, "unchanged").inc(unchanged)
    wanted_versions = list(
        dict.fromkeys(
            [(names[i], v) for i, _, vids in todo for v in vids]
            + [(names[i], v) for i, v in proof_keys.items()]
        )
    )
    stored = await store.read_versions_many(wanted_versions) if wanted_versions else []
    envelopes = dict(zip(wanted_versions, stored, strict=True))
    changed = loaded = 0
    for n, (i, state, vids) in enumerate(todo):
        if n % 32 == 31:
            await asyncio.sleep(0)  # let readers in between decrypts
        name = names[i]
        if i in proof_keys:
            assert guard is not None
            checked = await _proven(guard, name, state, envelopes.get((name, proof_keys[i])))
            if checked is None:
                left.append(name)  # unsure, or refused with nothing in service
                continue
            if checked is not state:
                # Refused: the guard hands back the map in service, as
                # Resolver.stages does for refresh(): nothing changes.
                in_service = seen[i]
                if in_service is not None:
                    cache._confirmed(in_service)
                continue
        opened = await _open_batch(cache, name, state, vids, envelopes)
        entry = cache._entries.get(name)
        if opened is None:
            left.append(name)
        elif entry is not seen[i] or (entry is not None and entry.state is not seen_states[i]):
            continue  # another refresh got there first; it read the map later
        elif cache._removed.get(name) != removed[i]:
            continue  # removed meanwhile (a reload dropped it): hold nothing
        else:
            _apply_batch(cache, name, entry, state, opened)
            if entry is None:
                loaded += 1
            else:
                changed += 1
    if changed:
        cache.metrics.version_checks.labels("changed").inc(changed)
        cache.metrics.refreshes.labels(trigger, "changed").inc(changed)
    if loaded:
        # A first load is not a change (as in refresh()).
        cache.metrics.refreshes.labels(trigger, "loaded").inc(loaded)
    cache.metrics.cache_secrets.set(len(cache._entries))
    return left


async def _proven(
    guard: StageGuard, name: str, state: StageState, key: StoredVersion | Exception | None
) -> StageState | None:
    """The guard's answer for ``state`` (its proof's key envelope pre-read).

    None when the batch cannot decide: the key envelope is missing or the
    guard raised (refresh() then reads again and reports).
    """
    if not isinstance(key, StoredVersion):
        return None
    try:
        return await guard.check(name, state, key_envelope=key)
    except AgentError:
        return None


async def _open_batch(
    cache: SecretCache,
    name: str,
    state: StageState,
    vids: list[str],
    envelopes: dict[tuple[str, str], StoredVersion | Exception],
) -> dict[str, Secret] | None:
    """The versions ``vids`` of ``name`` decrypted, or None to leave it to :meth:`refresh`."""
    entry = cache._entries.get(name)
    out: dict[str, Secret] = {}
    for vid in vids:
        got = envelopes.get((name, vid))
        if not isinstance(got, StoredVersion):
            return None
        if entry is not None and entry.refused and vid in entry.refused:
            return None
        try:
            out[vid] = await cache.resolver.open(
                name, vid, got.envelope, got.created_at, stages_of(state.stages, vid)
            )
        except AgentError:
            return None  # refresh() reads it again and reports (and audits) it
    if out:
        cache.metrics.fetches.labels("ok").inc(len(out))
    return out


def _apply_batch(
    cache: SecretCache, name: str, entry: Entry | None, state: StageState, opened: dict[str, Secret]
) -> None:
    if entry is None:
        entry = Entry(name, state, opened, cache.clock(), last_refresh=time.time())
        cache._entries[name] = entry
    else:
        entry.missing_since = None
        versions = {**restaged(entry.versions, state), **opened}
        cache._install(entry, state, versions)
    cache._notify(name)


async def changed_markers(cache: SecretCache, names: Sequence[str]) -> list[str]:
    """Of ``names``, those whose stage map may have changed, by the store's cheap markers.

    The others are confirmed fresh without reading anything (counted as
    unchanged version checks). Names not held, or without a marker, are
    returned too. For a :class:`~agent.stores.base.BatchReadableStore`.
    """
    store = cache.resolver.store
    assert isinstance(store, BatchReadableStore)
    markers = await store.stage_markers_many(names)
    changed: list[str] = []
    unchanged = 0
    for name, marker in zip(names, markers, strict=True):
        entry = cache._entries.get(name)
        if (
            entry is None
            or marker is None
            or marker != entry.state.marker
            or entry.missing_since is not None
        ):
            changed.append(name)
        else:
            cache._confirmed(entry)
            unchanged += 1
    if unchanged:
        cache.metrics.version_checks.labels("unchanged").inc(unchanged)
    return changed
