"""File-store specifics: on-disk layout, permissions, outages, symlinks, watch latency.

The shared behaviour is in test_contract.py. These tests run as root in CI,
where permission bits do not stop the agent; outages are then simulated the
ways a directory store really goes away for root: the directory is moved or
unmounted, or something else sits where it should be.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import os
import stat
import statistics
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from agent.config import AgentConfig, FileStoreConfig
from agent.errors import (
    AccessDenied,
    BackendUnavailable,
    InvalidName,
    SecretNotFound,
    VersionNotFound,
)
from agent.fsutil import is_temp_name
from agent.metrics import Metrics
from agent.stores import STORES, create_store
from agent.stores.base import WatchableStore, WritableStore
from agent.stores.file import FileStore

ENV = b'{"format": "secrets-agent/envelope", "v": 1}'


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """The store directory, as ``secrets-agent init`` leaves it: empty, 0700."""
    path = tmp_path / "store"
    path.mkdir(mode=0o700)
    return path


@pytest.fixture
async def store(root: Path) -> AsyncIterator[FileStore]:
    s = FileStore(root, store_id="main", watch_check_interval_ms=100)
    yield s
    await s.aclose()


async def _staged(store: WritableStore, name: str, *versions: str) -> None:
    for v in versions:
        await store.write_version(name, v, f"envelope {v}".encode())
    await store.set_stages(name, {"CURRENT": versions[-1]}, expected_revision="")


def _tree(root: Path) -> list[Path]:
    return sorted(root.rglob("*"))


# --------------------------------------------------------------------------- layout


async def test_layout_on_disk_is_the_documented_one(store: FileStore, root: Path) -> None:
    await store.write_version("prod/db", "v1", ENV)
    await store.write_version("prod/db", "v2", b"second")
    state = await store.set_stages(
        "prod/db", {"PREVIOUS": "v1", "CURRENT": "v2"}, expected_revision=""
    )
    secret = root / "secrets" / "prod" / "db"
    assert (secret / "versions" / "v1.json").read_bytes() == ENV
    assert (secret / "versions" / "v2.json").read_bytes() == b"second"
    text = (secret / "stages.json").read_text()
    assert json.loads(text) == {"CURRENT": "v2", "PREVIOUS": "v1"}
    assert text == '{"CURRENT": "v2", "PREVIOUS": "v1"}\n'
    visible = {p.relative_to(root).as_posix() for p in _tree(root)}
    assert visible == {
        "secrets",
        "secrets/prod",
        "secrets/prod/db",
        "secrets/prod/db/versions",
        "secrets/prod/db/versions/v1.json",
        "secrets/prod/db/versions/v2.json",
        "secrets/prod/db/stages.json",
        "secrets/prod/db/.lock",
    }
    assert state.revision == (await store.read_stages("prod/db")).revision


async def test_a_stage_map_written_by_hand_is_read(store: FileStore, root: Path) -> None:
    """Operators (and other tools) may write the documented layout directly."""
    versions = root / "secrets" / "app" / "versions"
    versions.mkdir(parents=True)
    (versions / "abc.json").write_bytes(ENV)
    (versions.parent / "stages.json").write_text('{"CURRENT": "abc"}')
    assert await store.list_names() == ["app"]
    assert dict((await store.read_stages("app")).stages) == {"CURRENT": "abc"}
    assert (await store.read_version("app", "abc")).envelope == ENV


async def test_the_revision_follows_content_not_mtime(store: FileStore, root: Path) -> None:
    await _staged(store, "app", "v1", "v2")
    before = await store.read_stages("app")
    stages = root / "secrets" / "app" / "stages.json"
    os.utime(stages, ns=(1, 1))
    assert (await store.read_stages("app")).revision == before.revision
    stages.write_text('{"CURRENT": "v1"}')
    os.utime(stages, ns=(1, 1))
    assert (await store.read_stages("app")).revision != before.revision


async def test_files_are_0600_and_directories_0700_whatever_the_umask(
    store: FileStore, root: Path
) -> None:
    old = os.umask(0)
    try:
        await _staged(store, "a/b/c", "v1", "v2")
        await store.replace_envelope("a/b/c", "v1", b"rewrapped", expected=b"envelope v1")
    finally:
        os.umask(old)
    for path in [root, *_tree(root)]:
        mode = stat.S_IMODE(path.lstat().st_mode)
        assert mode == (0o700 if path.is_dir() else 0o600), path


async def test_no_temp_files_are_left_after_writes_and_failed_writes(
    store: FileStore, root: Path
) -> None:
    await _staged(store, "app", "v1", "v2")
    with contextlib.suppress(Exception):
        await store.write_version("app", "v1", b"again")
    with contextlib.suppress(Exception):
        await store.set_stages("app", {"CURRENT": "v1"}, expected_revision="stale")
    with contextlib.suppress(Exception):
        await store.replace_envelope("app", "v1", b"x", expected=b"wrong")
    assert [p for p in _tree(root) if is_temp_name(p.name)] == []


async def test_from_config_builds_a_store_on_the_configured_path(tmp_path: Path) -> None:
    cfg = FileStoreConfig(type="file", path=tmp_path / "s", id="main")
    agent_config = AgentConfig(store=cfg)
    assert STORES["file"] == "agent.stores.file:FileStore"
    store = create_store(agent_config, metrics=Metrics())
    assert isinstance(store, FileStore)
    assert (store.root, store.store_id) == (tmp_path / "s", "main")
    assert not (tmp_path / "s").exists()  # building a store does no I/O


async def test_store_calls_are_counted_by_operation_and_outcome(root: Path) -> None:
    metrics = Metrics()
    store = FileStore(root, metrics=metrics)
    await _staged(store, "app", "v1")
    with pytest.raises(SecretNotFound):
        await store.read_stages("nope")

    def count(operation: str, outcome: str) -> float:
        value = metrics.registry.get_sample_value(
            "secrets_agent_store_operations_total",
            {"operation": operation, "outcome": outcome},
        )
        return value or 0.0

    assert count("write_version", "ok") == 1
    assert count("set_stages", "ok") == 1
    assert count("read_stages", "not_found") == 1


# --------------------------------------------------------------------------- names


@pytest.mark.parametrize(
    "name",
    [
        "versions",
        "a/versions",
        "a/versions/b",
        "stages.json",
        "a/stages.json",
        "a/.lock",
        ".x.tmp",
        "a/.stages.json.0a1b.tmp",
    ],
)
async def test_names_colliding_with_the_layout_are_refused_before_any_io(
    store: FileStore, root: Path, name: str
) -> None:
    with pytest.raises(InvalidName, match="reserved"):
        await store.write_version(name, "v1", ENV)
    with pytest.raises(InvalidName):
        await store.read_stages(name)
    assert list(root.iterdir()) == []


async def test_invalid_names_touch_nothing_on_disk(store: FileStore, root: Path) -> None:
    for name in ["../escape", "/abs", "a//b", "x" * 513]:
        with pytest.raises(InvalidName):
            await store.write_version(name, "v1", ENV)
    assert list(root.iterdir()) == []
    assert not (root.parent / "escape").exists()


async def test_names_that_look_like_other_layout_files_are_fine(store: FileStore) -> None:
    for name in ["stages.json.bak/x", "my-versions", ".hidden/a", "a/b.json"]:
        await _staged(store, name, "v1")
    assert await store.list_names() == sorted(
        ["stages.json.bak/x", "my-versions", ".hidden/a", "a/b.json"]
    )


# --------------------------------------------------------------------------- symlinks


async def test_a_symlinked_secret_dir_pointing_outside_the_root_is_refused(
    store: FileStore, root: Path, tmp_path: Path
) -> None:
    await _staged(store, "real", "v1")
    outside = tmp_path / "outside"
    (outside / "versions").mkdir(parents=True)
    (outside / "versions" / "v1.json").write_bytes(b"not ours")
    (outside / "stages.json").write_text('{"CURRENT": "v1"}')
    (root / "secrets" / "evil").symlink_to(outside)
    (root / "secrets" / "nested").mkdir()
    (root / "secrets" / "nested" / "evil").symlink_to(outside)

    for name in ["evil", "nested/evil", "evil/deeper"]:
        with pytest.raises(AccessDenied):
            await store.read_stages(name)
        with pytest.raises(AccessDenied):
            await store.read_version(name, "v1")
        with pytest.raises(AccessDenied):
            await store.write_version(name, "v2", b"x")
    assert await store.list_names() == ["real"]
    assert sorted(p.name for p in (outside / "versions").iterdir()) == ["v1.json"]


async def test_symlinked_files_inside_a_secret_are_not_followed(
    store: FileStore, root: Path, tmp_path: Path
) -> None:
    await _staged(store, "app", "v1")
    outside = tmp_path / "outside.json"
    outside.write_text('{"CURRENT": "v1"}')
    secret = root / "secrets" / "app"
    (secret / "versions" / "v2.json").symlink_to(outside)
    with pytest.raises(AccessDenied):
        await store.read_version("app", "v2")
    assert [v for v, _ in await store.list_versions("app")] == ["v1"]
    (secret / "stages.json").unlink()
    (secret / "stages.json").symlink_to(outside)
    with pytest.raises(AccessDenied):
        await store.read_stages("app")


# --------------------------------------------------------------------------- outages


async def _assert_unavailable(store: FileStore) -> None:
    for call in [
        store.list_names(),
        store.read_stages("app"),
        store.read_version("app", "v1"),
        store.list_versions("app"),
        store.read_stages("never/existed"),
    ]:
        with pytest.raises(BackendUnavailable):
            await call


async def _assert_up(store: FileStore) -> None:
    assert await store.list_names() == ["app"]
    assert (await store.read_version("app", "v1")).envelope == b"envelope v1"
    with pytest.raises(SecretNotFound):
        await store.read_stages("never/existed")


async def test_a_store_directory_moved_away_is_unavailable_then_recovers(
    store: FileStore, root: Path
) -> None:
    """What an unmounted or detached volume looks like, even to root; transient."""
    await _staged(store, "app", "v1")
    away = root.with_name("store.away")
    root.rename(away)
    await _assert_unavailable(store)
    away.rename(root)
    await _assert_up(store)


async def test_secrets_replaced_by_a_file_is_unavailable_then_recovers(
    store: FileStore, root: Path
) -> None:
    await _staged(store, "app", "v1")
    (root / "secrets").rename(root / "secrets.away")
    (root / "secrets").write_bytes(b"")
    await _assert_unavailable(store)
    (root / "secrets").unlink()
    (root / "secrets.away").rename(root / "secrets")
    await _assert_up(store)


def _permissions_enforced(tmp_path: Path) -> bool:
    """False for root with CAP_DAC_OVERRIDE, which reads through chmod 000."""
    probe = tmp_path / "probe"
    probe.mkdir(mode=0)
    try:
        os.listdir(probe)
    except PermissionError:
        return True
    finally:
        probe.chmod(0o700)
    return False


async def test_an_unreadable_store_directory_is_unavailable_then_recovers(
    store: FileStore, root: Path, tmp_path: Path
) -> None:
    if not _permissions_enforced(tmp_path):
        pytest.skip("permission bits are not enforced for this user (root)")
    await _staged(store, "app", "v1")
    root.chmod(0)
    try:
        await _assert_unavailable(store)
    finally:
        root.chmod(0o700)
    await _assert_up(store)


@pytest.mark.parametrize("code", [errno.EACCES, errno.EPERM, errno.EIO])
async def test_os_errors_reading_the_store_are_unavailable_not_missing(
    store: FileStore, monkeypatch: pytest.MonkeyPatch, code: int
) -> None:
    """The mapping the chmod test checks as non-root, checked as root too."""
    await _staged(store, "app", "v1")

    real_lstat = os.lstat
    secrets = os.fspath(store.root / "secrets")

    def refuse(path: Any, *args: Any, **kwargs: Any) -> os.stat_result:
        if os.fspath(path).startswith(secrets):
            raise OSError(code, os.strerror(code), str(path))
        return real_lstat(path, *args, **kwargs)

    monkeypatch.setattr(os, "lstat", refuse)
    with pytest.raises(BackendUnavailable, match=errno.errorcode[code]):
        await store.read_stages("app")


async def test_a_missing_store_root_is_unavailable_and_never_recreated_by_a_write(
    store: FileStore, root: Path
) -> None:
    """A root that went away is an outage: a put must not recreate an empty store there."""
    root.rmdir()
    with pytest.raises(BackendUnavailable, match="does not exist"):
        await store.list_names()
    with pytest.raises(BackendUnavailable, match="does not exist"):
        await store.write_version("app", "v1", ENV)
    assert not root.exists()
    root.mkdir()
    await _staged(store, "app", "v1")
    assert await store.list_names() == ["app"]


async def test_an_existing_root_without_secrets_is_an_empty_store(
    store: FileStore, root: Path
) -> None:
    assert await store.list_names() == []
    with pytest.raises(SecretNotFound):
        await store.read_stages("app")


async def test_a_corrupt_stage_map_is_unavailable_so_cached_values_are_kept(
    store: FileStore, root: Path
) -> None:
    await _staged(store, "app", "v1")
    (root / "secrets" / "app" / "stages.json").write_text('["not", "a", "map"]')
    with pytest.raises(BackendUnavailable, match="not a JSON object"):
        await store.read_stages("app")


async def test_a_version_file_removed_by_hand_is_version_not_found(
    store: FileStore, root: Path
) -> None:
    await _staged(store, "app", "v1", "v2")
    (root / "secrets" / "app" / "versions" / "v1.json").unlink()
    with pytest.raises(VersionNotFound):
        await store.read_version("app", "v1")
    with pytest.raises(VersionNotFound):
        await store.set_stages(
            "app", {"CURRENT": "v1"}, expected_revision=(await store.read_stages("app")).revision
        )


# --------------------------------------------------------------------------- watch


def test_changed_paths_map_to_secret_names(store: FileStore, root: Path) -> None:
    (root / "secrets" / "new" / "deep" / "versions").mkdir(parents=True)
    s = root / "secrets"
    cases = {
        s / "app" / "stages.json": {"app"},
        s / "a" / "b" / "versions" / "v1.json": {"a/b"},
        s / "a" / "b" / "versions": {"a/b"},
        s / "app" / ".stages.json.0a1b2c.tmp": set(),
        s / "app" / "versions" / ".v1.json.0a1b2c.tmp": set(),
        s / "app" / ".lock": set(),
        s / "new": {"new/deep"},  # a new directory is searched for secrets
        s / "gone-dir": set(),
        root / "elsewhere" / "stages.json": set(),
        s / "versions" / "x.json": set(),
    }
    for path, names in cases.items():
        assert store._names_of_change(str(path)) == names, path


async def test_watch_of_a_missing_store_directory_is_unavailable(
    store: FileStore, root: Path
) -> None:
    root.rmdir()
    with pytest.raises(BackendUnavailable):
        async with asyncio.timeout(5):
            await anext(aiter(store.watch()))


async def test_watch_breaks_with_unavailable_when_the_store_is_moved_away(
    store: FileStore, root: Path
) -> None:
    await _staged(store, "app", "v1")
    assert isinstance(store, WatchableStore)
    events = store.watch()
    try:
        async with asyncio.timeout(5):
            assert (await anext(events)).names is None
            root.rename(root.with_name("away"))
            with pytest.raises(BackendUnavailable, match="moved, replaced or removed"):
                while True:
                    await anext(events)
    finally:
        await events.aclose()  # type: ignore[attr-defined]


async def test_watch_latency_is_printed(
    store: FileStore, capsys: pytest.CaptureFixture[str]
) -> None:
    """Measures set_stages -> event delay (printed for the record, not asserted)."""
    await _staged(store, "app", *[f"v{i}" for i in range(21)])
    writer = FileStore(store.root)
    events = store.watch()
    delays = []
    try:
        async with asyncio.timeout(30):
            assert (await anext(events)).names is None
            for i in range(20):
                state = await writer.read_stages("app")
                started = time.perf_counter()
                await writer.set_stages(
                    "app", {"CURRENT": f"v{i}"}, expected_revision=state.revision
                )
                while "app" not in ((await anext(events)).names or ()):
                    pass
                delays.append((time.perf_counter() - started) * 1000)
    finally:
        await events.aclose()  # type: ignore[attr-defined]
    delays.sort()
    with capsys.disabled():
        print(
            f"\nfile store watch latency over {len(delays)} changes: "
            f"p50 {statistics.median(delays):.1f} ms, max {delays[-1]:.1f} ms "
            f"(debounce {store.watch_debounce_ms} ms, step {store.watch_step_ms} ms)"
        )


async def test_listing_and_markers_run_on_the_loop_in_slices_not_in_a_thread(
    store: FileStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Profiled (docs/performance.md): in a worker thread each stat or scandir
    # waited for the GIL behind busy readers; a 10,000-secret resync took 46 s.
    for i in range(600):
        await _staged(store, f"bulk/s{i:03d}", "v1")
    await store.list_names()  # the one-time ownership check may use a thread

    async def no_thread(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("a worker thread was used")

    monkeypatch.setattr(asyncio, "to_thread", no_thread)
    yields = 0
    real_sleep = asyncio.sleep

    async def counting_sleep(delay: float, *args: Any) -> Any:
        nonlocal yields
        yields += delay == 0
        return await real_sleep(delay, *args)

    monkeypatch.setattr(asyncio, "sleep", counting_sleep)
    names = await store.list_names()
    assert len(names) == 600 and names == sorted(names)
    markers = await store.stage_markers_many(names)
    assert all(m is not None for m in markers)
    assert yields >= 2  # it gave the loop back between slices
