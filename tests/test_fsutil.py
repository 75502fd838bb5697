"""Atomic writes and file locks (agent/fsutil.py)."""

from __future__ import annotations

import asyncio
import errno
import os
import stat
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.fsutil import (
    FileLock,
    atomic_write,
    create_exclusive,
    is_temp_name,
    make_dirs,
    read_nofollow,
)

OTHER_UID = 65534  # nobody


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


def _temps(directory: Path) -> list[str]:
    return [p.name for p in directory.iterdir() if is_temp_name(p.name)]


@pytest.fixture
def umask_000() -> Iterator[None]:
    """A permissive umask, so modes must come from fchmod, not luck."""
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


# --------------------------------------------------------------------------- atomic_write


def test_atomic_write_creates_the_file_with_exact_mode_and_content(
    tmp_path: Path, umask_000: None
) -> None:
    target = tmp_path / "out"
    atomic_write(target, b"hello", mode=0o640)
    assert target.read_bytes() == b"hello"
    assert _mode(target) == 0o640
    assert _temps(tmp_path) == []


def test_atomic_write_mode_is_exact_even_under_a_restrictive_umask(tmp_path: Path) -> None:
    old = os.umask(0o077)
    try:
        atomic_write(tmp_path / "out", b"x", mode=0o644)
    finally:
        os.umask(old)
    assert _mode(tmp_path / "out") == 0o644


def test_mode_and_owner_are_set_before_any_content_is_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, umask_000: None
) -> None:
    """The temp file already has the final mode/owner when its first byte is written."""
    seen: list[os.stat_result] = []
    real_write = os.write

    def spy(fd: int, data: bytes) -> int:
        seen.append(os.fstat(fd))
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", spy)
    uid = OTHER_UID if os.geteuid() == 0 else os.getuid()
    gid = OTHER_UID if os.geteuid() == 0 else os.getgid()
    target = tmp_path / "out"
    atomic_write(target, b"secret-ish", mode=0o400, uid=uid, gid=gid)
    monkeypatch.undo()
    assert seen, "os.write was never called"
    first = seen[0]
    assert first.st_size == 0
    assert stat.S_IMODE(first.st_mode) == 0o400
    assert (first.st_uid, first.st_gid) == (uid, gid)
    final = target.lstat()
    assert (stat.S_IMODE(final.st_mode), final.st_uid, final.st_gid) == (0o400, uid, gid)


def test_atomic_write_replaces_an_existing_file(tmp_path: Path) -> None:
    target = tmp_path / "out"
    target.write_bytes(b"old")
    atomic_write(target, b"new", mode=0o600)
    assert target.read_bytes() == b"new"
    assert _temps(tmp_path) == []


def test_a_failed_rename_keeps_the_old_file_and_leaves_no_temp(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "out"
    target.write_bytes(b"old")

    def broken_replace(src: object, dst: object) -> None:
        raise OSError(errno.EIO, "injected failure")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="injected"):
        atomic_write(target, b"new", mode=0o600)
    monkeypatch.undo()
    assert target.read_bytes() == b"old"
    assert _temps(tmp_path) == []


def test_a_failed_fsync_keeps_the_old_file_and_leaves_no_temp(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "out"
    target.write_bytes(b"old")

    def broken_fsync(fd: int) -> None:
        raise OSError(errno.ENOSPC, "injected full disk")

    monkeypatch.setattr(os, "fsync", broken_fsync)
    with pytest.raises(OSError, match="injected"):
        atomic_write(target, b"new", mode=0o600)
    monkeypatch.undo()
    assert target.read_bytes() == b"old"
    assert _temps(tmp_path) == []


def test_atomic_write_replaces_a_symlink_instead_of_writing_through_it(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.write_bytes(b"untouched")
    link = tmp_path / "link"
    link.symlink_to(outside)
    atomic_write(link, b"new", mode=0o600)
    assert outside.read_bytes() == b"untouched"
    assert not link.is_symlink()
    assert link.read_bytes() == b"new"


def test_atomic_write_can_set_timestamps(tmp_path: Path) -> None:
    atomic_write(tmp_path / "out", b"x", mode=0o600, times_ns=(1_000_000_123, 2_000_000_456))
    assert (tmp_path / "out").stat().st_mtime_ns == 2_000_000_456


# --------------------------------------------------------------------------- create_exclusive


def test_create_exclusive_refuses_an_existing_path_and_keeps_it(tmp_path: Path) -> None:
    target = tmp_path / "v1.json"
    create_exclusive(target, b"first", mode=0o600)
    with pytest.raises(FileExistsError):
        create_exclusive(target, b"second", mode=0o600)
    assert target.read_bytes() == b"first"
    assert _mode(target) == 0o600
    assert _temps(tmp_path) == []


def test_create_exclusive_between_racing_threads_exactly_one_wins(tmp_path: Path) -> None:
    target = tmp_path / "v1.json"
    start = threading.Barrier(8)
    outcomes: list[bytes | None] = []

    def writer(i: int) -> None:
        data = f"writer {i}".encode()
        start.wait()
        try:
            create_exclusive(target, data, mode=0o600)
            outcomes.append(data)
        except FileExistsError:
            outcomes.append(None)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    winners = [o for o in outcomes if o is not None]
    assert len(outcomes) == 8 and len(winners) == 1
    assert target.read_bytes() == winners[0]
    assert _temps(tmp_path) == []


# --------------------------------------------------------------------------- small helpers


def test_read_nofollow_refuses_symlinks_and_non_regular_files(tmp_path: Path) -> None:
    (tmp_path / "real").write_bytes(b"data")
    (tmp_path / "link").symlink_to(tmp_path / "real")
    os.mkfifo(tmp_path / "fifo")
    assert read_nofollow(tmp_path / "real")[0] == b"data"
    with pytest.raises(OSError) as loop:
        read_nofollow(tmp_path / "link")
    assert loop.value.errno == errno.ELOOP
    with pytest.raises(OSError) as fifo:  # and does not hang waiting for a writer
        read_nofollow(tmp_path / "fifo")
    assert fifo.value.errno == errno.EINVAL
    with pytest.raises(FileNotFoundError):
        read_nofollow(tmp_path / "missing")


def test_make_dirs_creates_every_missing_level_with_the_mode(
    tmp_path: Path, umask_000: None
) -> None:
    make_dirs(tmp_path / "a" / "b" / "c", mode=0o700)
    assert [_mode(tmp_path / p) for p in ("a", "a/b", "a/b/c")] == [0o700] * 3
    make_dirs(tmp_path / "a" / "b" / "c", mode=0o700)  # idempotent


# --------------------------------------------------------------------------- FileLock


def test_file_lock_excludes_a_second_locker_until_released(tmp_path: Path) -> None:
    path = tmp_path / ".lock"
    second = FileLock(path)
    with FileLock(path) as held:
        assert held.locked
        assert second.acquire(blocking=False) is False
        assert not second.locked
    other = FileLock(path)
    assert other.acquire(blocking=False) is True
    other.release()
    assert _mode(path) == 0o600


def test_file_lock_blocks_a_thread_until_the_holder_releases(tmp_path: Path) -> None:
    path = tmp_path / ".lock"
    order: list[str] = []
    holder = FileLock(path)
    holder.acquire()
    waiter_started = threading.Event()

    def waiter() -> None:
        waiter_started.set()
        with FileLock(path):
            order.append("waiter acquired")

    thread = threading.Thread(target=waiter)
    thread.start()
    waiter_started.wait(5)
    time.sleep(0.05)  # not synchronisation: only gives the waiter time to block
    order.append("holder releasing")
    holder.release()
    thread.join(5)
    assert order == ["holder releasing", "waiter acquired"]


def test_file_lock_is_not_reentrant(tmp_path: Path) -> None:
    with FileLock(tmp_path / ".lock") as lock, pytest.raises(RuntimeError):
        lock.acquire()


async def test_async_file_lock_waits_for_the_holder_without_blocking_the_loop(
    tmp_path: Path,
) -> None:
    path = tmp_path / ".lock"
    holder = FileLock(path)
    holder.acquire()
    acquired = asyncio.Event()

    async def waiter() -> None:
        async with FileLock(path):
            acquired.set()

    task = asyncio.create_task(waiter())
    await asyncio.sleep(0.05)  # the loop keeps running while the waiter blocks in a thread
    assert not acquired.is_set()
    holder.release()
    async with asyncio.timeout(5):
        await task
    assert acquired.is_set()


async def test_a_cancelled_async_waiter_does_not_keep_the_lock(tmp_path: Path) -> None:
    path = tmp_path / ".lock"
    holder = FileLock(path)
    holder.acquire()
    waiter = FileLock(path)
    task = asyncio.create_task(waiter.__aenter__())
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    holder.release()
    # The worker thread still takes the lock once it is free, then drops it.
    probe = FileLock(path)
    async with asyncio.timeout(5):
        while not probe.acquire(blocking=False):
            await asyncio.sleep(0.01)
    probe.release()
    assert not waiter.locked
