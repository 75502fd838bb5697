"""The store contract: every store kind must pass every test here (see conftest.py).

Envelopes are opaque bytes to a store, so these tests use arbitrary bytes
(including non-UTF-8) rather than real envelopes.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import pytest

from agent.errors import BadRequest, Conflict, InvalidName, SecretNotFound, VersionNotFound
from agent.stores.base import StageState, WatchableStore, WatchEvent, WritableStore
from tests.stores.conftest import StoreFactory

ENV_A = b'{"format": "secrets-agent/envelope", "v": 1, "id": "a"}'
ENV_B = b"\x00\xff binary envelope \x80"
WATCH_BOUND = 5.0  # seconds: a liveness bound, not a latency target

INVALID_NAMES = ["../x", "/abs", "a//b", "a" * 513, "", "a/../b", "a/./b", "sp ace", "a/"]


def skip_unless(store: object, capability: str) -> None:
    """Skip a test of a behaviour the store documents it cannot offer.

    ``mutable_envelopes``: replace_envelope (AWS Secrets Manager versions are
    immutable). ``fine_timestamps``: creation times finer than a second (moto's
    Secrets Manager rounds them). ``label_cas``: stage moves compared against
    the stored map (moto does not check RemoveFromVersionId; real AWS does).
    ``version_delete``: a deleted version is gone at once (Secrets Manager only
    deprecates it, and AWS deletes it later).
    """
    if capability in getattr(store, "lacks", ()):
        pytest.skip(f"{type(store).__name__} documents that it lacks {capability}")


async def _secret(store: WritableStore, name: str, *versions: str) -> None:
    for version_id in versions:
        await store.write_version(name, version_id, f"envelope {version_id}".encode())


# --------------------------------------------------------------------------- names


async def test_list_names_is_empty_for_a_new_store_then_sorted(store_factory: StoreFactory) -> None:
    store = await store_factory()
    assert await store.list_names() == []
    for name in ["zeta", "alpha", "mid/b", "mid/a", "Alpha"]:
        await _secret(store, name, "v1")
    assert await store.list_names() == sorted(["zeta", "alpha", "mid/b", "mid/a", "Alpha"])


async def test_names_with_slashes_are_separate_secrets_even_when_nested(
    store_factory: StoreFactory,
) -> None:
    store = await store_factory()
    await store.write_version("a", "v1", b"top")
    await store.write_version("a/b", "v1", b"middle")
    await store.write_version("a/b/c", "v1", b"leaf")
    assert await store.list_names() == ["a", "a/b", "a/b/c"]
    assert (await store.read_version("a/b", "v1")).envelope == b"middle"
    assert (await store.read_version("a/b/c", "v1")).envelope == b"leaf"
    assert [v for v, _ in await store.list_versions("a")] == ["v1"]


@pytest.mark.parametrize("name", INVALID_NAMES, ids=lambda n: repr(n)[:20])
async def test_invalid_names_are_refused_before_any_io(
    store_factory: StoreFactory, name: str
) -> None:
    store = await store_factory()
    calls = [
        store.write_version(name, "v1", ENV_A),
        store.read_stages(name),
        store.read_version(name, "v1"),
        store.list_versions(name),
        store.set_stages(name, {}, expected_revision=""),
        store.replace_envelope(name, "v1", ENV_B, expected=ENV_A),
    ]
    for call in calls:
        with pytest.raises(InvalidName):
            await call
    assert await store.list_names() == []


@pytest.mark.parametrize("version_id", ["../v", "a/b", "", "x" * 257, "v 1"])
async def test_invalid_version_ids_are_refused(
    store_factory: StoreFactory, version_id: str
) -> None:
    store = await store_factory()
    await _secret(store, "app", "v1")
    with pytest.raises(BadRequest):
        await store.write_version("app", version_id, ENV_A)
    with pytest.raises(BadRequest):
        await store.read_version("app", version_id)
    with pytest.raises(BadRequest):
        await store.set_stages("app", {"CURRENT": version_id}, expected_revision="")
    assert [v for v, _ in await store.list_versions("app")] == ["v1"]


# --------------------------------------------------------------------------- versions


async def test_write_then_read_returns_identical_bytes_and_a_recent_utc_time(
    store_factory: StoreFactory,
) -> None:
    store = await store_factory()
    before = datetime.now(UTC)
    await store.write_version("prod/db", "4f0c-1", ENV_B)
    stored = await store.read_version("prod/db", "4f0c-1")
    assert (stored.name, stored.version_id, stored.envelope) == ("prod/db", "4f0c-1", ENV_B)
    assert stored.created_at.utcoffset() == timedelta(0)
    assert (
        before - timedelta(minutes=1)
        <= stored.created_at
        <= datetime.now(UTC) + timedelta(minutes=1)
    )


async def test_writing_an_existing_version_id_conflicts_and_keeps_the_original(
    store_factory: StoreFactory,
) -> None:
    store = await store_factory()
    await store.write_version("app", "v1", ENV_A)
    with pytest.raises(Conflict):
        await store.write_version("app", "v1", ENV_B)
    assert (await store.read_version("app", "v1")).envelope == ENV_A


async def test_racing_writers_of_one_version_id_exactly_one_wins(
    store_factory: StoreFactory,
) -> None:
    one = await store_factory(namespace="race")
    two = await store_factory(namespace="race")
    for i in range(10):
        results = await asyncio.gather(
            one.write_version("app", f"v{i}", ENV_A),
            two.write_version("app", f"v{i}", ENV_B),
            return_exceptions=True,
        )
        assert sorted(type(r).__name__ for r in results) == ["Conflict", "NoneType"]
        winner = ENV_A if results[0] is None else ENV_B
        assert (await one.read_version("app", f"v{i}")).envelope == winner


async def test_reading_a_missing_secret_raises_secret_not_found(
    store_factory: StoreFactory,
) -> None:
    store = await store_factory()
    await _secret(store, "other", "v1")
    with pytest.raises(SecretNotFound):
        await store.read_stages("missing")
    with pytest.raises(SecretNotFound):
        await store.read_version("missing", "v1")
    with pytest.raises(SecretNotFound):
        await store.list_versions("missing")


async def test_reading_a_missing_version_raises_version_not_found(
    store_factory: StoreFactory,
) -> None:
    store = await store_factory()
    await _secret(store, "app", "v1")
    with pytest.raises(VersionNotFound):
        await store.read_version("app", "v2")


async def test_list_versions_is_oldest_first_not_by_id(store_factory: StoreFactory) -> None:
    store = await store_factory()
    skip_unless(store, "fine_timestamps")
    await _secret(store, "app", "c", "b", "a", "d")
    listed = await store.list_versions("app")
    assert [v for v, _ in listed] == ["c", "b", "a", "d"]
    times = [t for _, t in listed]
    assert times == sorted(times)
    assert all(t.utcoffset() == timedelta(0) for t in times)


async def test_replace_envelope_swaps_when_expected_matches_and_keeps_created_at(
    store_factory: StoreFactory,
) -> None:
    store = await store_factory()
    skip_unless(store, "mutable_envelopes")
    await store.write_version("app", "v1", ENV_A)
    created = (await store.read_version("app", "v1")).created_at
    await store.replace_envelope("app", "v1", ENV_B, expected=ENV_A)
    stored = await store.read_version("app", "v1")
    assert stored.envelope == ENV_B
    assert stored.created_at == created


async def test_replace_envelope_conflicts_when_the_envelope_changed(
    store_factory: StoreFactory,
) -> None:
    store = await store_factory()
    skip_unless(store, "mutable_envelopes")
    await store.write_version("app", "v1", ENV_A)
    with pytest.raises(Conflict):
        await store.replace_envelope("app", "v1", b"new", expected=ENV_B)
    assert (await store.read_version("app", "v1")).envelope == ENV_A


async def test_replace_envelope_of_a_missing_version_raises_not_found(
    store_factory: StoreFactory,
) -> None:
    store = await store_factory()
    skip_unless(store, "mutable_envelopes")
    await _secret(store, "app", "v1")
    with pytest.raises(VersionNotFound):
        await store.replace_envelope("app", "v2", ENV_B, expected=ENV_A)
    with pytest.raises(SecretNotFound):
        await store.replace_envelope("nope", "v1", ENV_B, expected=ENV_A)


# --------------------------------------------------------------------------- stages


async def test_read_stages_of_a_secret_without_stages_has_empty_revision(
    store_factory: StoreFactory,
) -> None:
    store = await store_factory()
    await _secret(store, "app", "v1")
    state = await store.read_stages("app")
    assert dict(state.stages) == {}
    assert state.revision == ""


async def test_set_stages_with_the_current_revision_succeeds_and_changes_it(
    store_factory: StoreFactory,
) -> None:
    store = await store_factory()
    await _secret(store, "app", "v1", "v2")
    first = await store.set_stages("app", {"CURRENT": "v1"}, expected_revision="")
    assert dict(first.stages) == {"CURRENT": "v1"}
    assert first.revision != ""
    assert await _read(store, "app") == first
    second = await store.set_stages(
        "app", {"CURRENT": "v2", "PREVIOUS": "v1"}, expected_revision=first.revision
    )
    assert second.revision not in ("", first.revision)
    assert await _read(store, "app") == second
    assert second.version_for("PREVIOUS") == "v1"


async def _read(store: WritableStore, name: str) -> StageState:
    state = await store.read_stages(name)
    return StageState(dict(state.stages), state.revision)


async def test_set_stages_with_a_stale_revision_conflicts_and_writes_nothing(
    store_factory: StoreFactory,
) -> None:
    store = await store_factory()
    await _secret(store, "app", "v1", "v2")
    first = await store.set_stages("app", {"CURRENT": "v1"}, expected_revision="")
    for stale in ["", "not-a-revision"]:
        with pytest.raises(Conflict):
            await store.set_stages("app", {"CURRENT": "v2"}, expected_revision=stale)
    assert await _read(store, "app") == StageState({"CURRENT": "v1"}, first.revision)


async def test_set_stages_pointing_at_a_missing_version_raises_and_writes_nothing(
    store_factory: StoreFactory,
) -> None:
    store = await store_factory()
    await _secret(store, "app", "v1")
    with pytest.raises(VersionNotFound):
        await store.set_stages("app", {"CURRENT": "v1", "PENDING": "v9"}, expected_revision="")
    assert await _read(store, "app") == StageState({}, "")


async def test_set_stages_of_a_missing_secret_raises_secret_not_found(
    store_factory: StoreFactory,
) -> None:
    store = await store_factory()
    with pytest.raises(SecretNotFound):
        await store.set_stages("nope", {}, expected_revision="")


async def test_set_stages_refuses_unnormalised_or_invalid_stage_labels(
    store_factory: StoreFactory,
) -> None:
    store = await store_factory()
    await _secret(store, "app", "v1")
    for label in ["AWSCURRENT", "bad label", ""]:
        with pytest.raises(BadRequest):
            await store.set_stages("app", {label: "v1"}, expected_revision="")
    assert await _read(store, "app") == StageState({}, "")


async def test_delete_version_removes_an_unstaged_version_only(
    store_factory: StoreFactory,
) -> None:
    store = await store_factory()
    await _secret(store, "app", "v1", "v2", "v3")
    await store.set_stages("app", {"CURRENT": "v3", "PREVIOUS": "v2"}, expected_revision="")
    await store.delete_version("app", "v1")
    with pytest.raises(Conflict):
        await store.delete_version("app", "v2")  # PREVIOUS points at it
    with pytest.raises(Conflict):
        await store.delete_version("app", "v3")
    assert (await store.read_version("app", "v2")).envelope == b"envelope v2"
    assert (await store.read_version("app", "v3")).envelope == b"envelope v3"
    assert dict((await store.read_stages("app")).stages) == {"CURRENT": "v3", "PREVIOUS": "v2"}
    skip_unless(store, "version_delete")
    with pytest.raises(VersionNotFound):
        await store.read_version("app", "v1")
    assert [v for v, _ in await store.list_versions("app")] == ["v2", "v3"]
    with pytest.raises(VersionNotFound):
        await store.delete_version("app", "v1")


async def test_delete_version_of_a_missing_secret_raises_secret_not_found(
    store_factory: StoreFactory,
) -> None:
    store = await store_factory()
    with pytest.raises(SecretNotFound):
        await store.delete_version("nothing-here", "v1")


async def test_stage_changes_are_seen_by_another_client_of_the_same_store(
    store_factory: StoreFactory,
) -> None:
    one = await store_factory(namespace="shared")
    two = await store_factory(namespace="shared")
    await _secret(one, "app", "v1")
    state = await one.set_stages("app", {"CURRENT": "v1"}, expected_revision="")
    assert await _read(two, "app") == StageState({"CURRENT": "v1"}, state.revision)


async def test_racing_set_stages_from_one_revision_exactly_one_wins(
    store_factory: StoreFactory,
) -> None:
    """Two clients move CURRENT from the same revision: one wins, one gets Conflict."""
    one = await store_factory(namespace="race")
    skip_unless(one, "label_cas")
    two = await store_factory(namespace="race")
    for i in range(20):
        name = f"race/{i}"
        await _secret(one, name, "base", "a", "b")
        base = await one.set_stages(name, {"CURRENT": "base"}, expected_revision="")
        wanted = [{"CURRENT": "a", "PREVIOUS": "base"}, {"CURRENT": "b", "PREVIOUS": "base"}]
        results = await asyncio.gather(
            one.set_stages(name, wanted[0], expected_revision=base.revision),
            two.set_stages(name, wanted[1], expected_revision=base.revision),
            return_exceptions=True,
        )
        winners = [i for i, r in enumerate(results) if isinstance(r, StageState)]
        losers = [r for r in results if isinstance(r, Conflict)]
        assert len(winners) == 1 and len(losers) == 1, results
        assert dict((await one.read_stages(name)).stages) == wanted[winners[0]]


# --------------------------------------------------------------------------- watch


@contextlib.asynccontextmanager
async def _watching(store: WritableStore) -> AsyncIterator[AsyncIterator[WatchEvent]]:
    """``store.watch()``, closed afterwards; skips the test if the store cannot push."""
    if not isinstance(store, WatchableStore):
        pytest.skip(f"{type(store).__name__} cannot push changes")
    events = store.watch()
    try:
        yield events
    finally:
        aclose = getattr(events, "aclose", None)
        if aclose is not None:
            await aclose()


async def _next_with(events: AsyncIterator[WatchEvent], name: str) -> WatchEvent:
    """The first event whose names include ``name`` (events for other names are skipped)."""
    async with asyncio.timeout(WATCH_BOUND):
        async for event in events:
            if event.names is not None and name in event.names:
                return event
    raise AssertionError("the watch ended")


async def test_watch_starts_with_a_resync_event(store_factory: StoreFactory) -> None:
    async with _watching(await store_factory()) as events:
        async with asyncio.timeout(WATCH_BOUND):
            first = await anext(events)
    assert first == WatchEvent(None)


async def test_watch_reports_a_stage_change_by_another_client(
    store_factory: StoreFactory,
) -> None:
    watcher = await store_factory(namespace="w")
    writer = await store_factory(namespace="w")
    await _secret(writer, "app/db", "v1")
    async with _watching(watcher) as events:
        assert (await anext(events)).names is None
        await writer.set_stages("app/db", {"CURRENT": "v1"}, expected_revision="")
        await _next_with(events, "app/db")


async def test_watch_reports_a_new_nested_secret_created_after_it_started(
    store_factory: StoreFactory,
) -> None:
    watcher = await store_factory(namespace="w")
    writer = await store_factory(namespace="w")
    async with _watching(watcher) as events:
        assert (await anext(events)).names is None
        await _secret(writer, "new/deep/secret", "v1")
        await writer.set_stages("new/deep/secret", {"CURRENT": "v1"}, expected_revision="")
        await _next_with(events, "new/deep/secret")


async def test_watch_reports_a_replaced_envelope(store_factory: StoreFactory) -> None:
    watcher = await store_factory(namespace="w")
    writer = await store_factory(namespace="w")
    await _secret(writer, "app", "v1")
    async with _watching(watcher) as events:
        assert (await anext(events)).names is None
        await writer.replace_envelope("app", "v1", ENV_B, expected=b"envelope v1")
        await _next_with(events, "app")


async def test_cancelling_a_watch_consumer_ends_it_promptly(store_factory: StoreFactory) -> None:
    store = await store_factory()
    if not isinstance(store, WatchableStore):
        pytest.skip(f"{type(store).__name__} cannot push changes")
    started = asyncio.Event()

    async def consume() -> None:
        async for _event in store.watch():
            started.set()

    task = asyncio.create_task(consume())
    async with asyncio.timeout(WATCH_BOUND):
        await started.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
