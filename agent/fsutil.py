"""Crash-safe file writes, shared by the file store, rendering and the key files.

A reader must only ever see the old bytes or the new bytes of a file, with the
final owner and mode: never a half-written file, and never a moment where the
content is visible under a looser mode. So every write goes to a temporary file
in the same directory (same filesystem, so the rename is atomic), created with
``O_EXCL`` and the final mode, chowned/chmodded *before* any content is written,
fsynced, then renamed into place; the directory is fsynced so the rename
survives a crash. On any error the temporary file is removed and the old file
is left untouched.

Temporary files are named ``.<target>.<random>.tmp`` so watchers and directory
walkers can recognise and skip them (:func:`is_temp_name`).

The inter-process lock (:class:`FileLock`, in :mod:`agent.fslock`) and the
directory ownership checks (:func:`open_checked_dir` and friends, in
:mod:`agent.fsowner`) are re-exported here, where their users import them.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import functools
import os
import secrets
import stat
import sys
from pathlib import Path
from typing import Any

from agent.bounded import read_fd_capped
from agent.fslock import FileLock
from agent.fsowner import (
    UnsafeDirectory,
    check_directory,
    denied_suffix,
    describe,
    explain_denied,
    open_checked_dir,
    safe_realpath,
)

__all__ = [
    "TEMP_SUFFIX",
    "FileLock",
    "UnsafeDirectory",
    "atomic_write",
    "atomic_write_at",
    "check_directory",
    "create_exclusive",
    "denied_suffix",
    "describe",
    "explain_denied",
    "fsync_dir",
    "is_temp_name",
    "make_dirs",
    "open_checked_dir",
    "read_nofollow",
    "safe_realpath",
    "sync_filesystem",
]

#: Suffix of the temporary files this module creates (they also start with ``.``).
TEMP_SUFFIX = ".tmp"

_TEMP_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW


def is_temp_name(filename: str) -> bool:
    """Whether ``filename`` (one path component) looks like one of our temporary files."""
    return filename.startswith(".") and filename.endswith(TEMP_SUFFIX)


def fsync_dir(path: Path) -> None:
    """fsync a directory, so a rename or link inside it is durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sync_filesystem(path: Path) -> None:
    """Make every write to the filesystem holding ``path`` durable: ``syncfs(2)``.

    One call for a batch of writes made with ``sync=False`` (``import``), in
    place of two fsyncs per file. Falls back to ``sync(2)`` where libc has no
    syncfs.
    """
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        libc = _libc()
        if libc is None or libc.syncfs(fd) != 0:
            os.sync()
    finally:
        os.close(fd)


@functools.cache
def _libc() -> Any:
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    except OSError:
        return None


def read_nofollow(
    path: str | os.PathLike[str], *, limit: int | None = None
) -> tuple[bytes, os.stat_result]:
    """The bytes and stat of the regular file ``path``, refusing a symlink there.

    Args:
        limit: refuse a file larger than this many bytes before reading it.

    Raises:
        FileNotFoundError: no such file.
        TooLarge: the file is over ``limit`` (a ValueError, not an OSError).
        OSError: ELOOP if ``path`` is a symlink, EINVAL if it is not a regular
            file; any other read error.
    """
    # O_NONBLOCK: a FIFO planted at ``path`` must not hang the reader.
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise OSError(errno.EINVAL, "not a regular file", str(path))
        return read_fd_capped(fd, st, limit=sys.maxsize if limit is None else limit), st
    finally:
        os.close(fd)


def make_dirs(directory: Path, *, mode: int) -> None:
    """Create ``directory`` and its missing parents with exactly ``mode`` (whatever the umask).

    Existing directories are left as they are; one created concurrently by
    another writer is fine.
    """
    if directory.is_dir():
        return
    make_dirs(directory.parent, mode=mode)
    try:
        directory.mkdir(mode)
    except FileExistsError:
        return
    directory.chmod(mode)


def atomic_write(
    path: Path,
    data: bytes,
    *,
    mode: int,
    uid: int | None = None,
    gid: int | None = None,
    times_ns: tuple[int, int] | None = None,
    sync: bool = True,
) -> None:
    """Replace ``path`` with ``data`` atomically, with ``mode`` and owner set first.

    Args:
        path: the destination; its directory must exist. A symlink at ``path``
            is replaced by the file, never followed.
        mode: the final permission bits (applied with fchmod, so the umask
            does not narrow or widen them).
        uid, gid: the final owner, if not the caller's (needs privilege).
        times_ns: ``(atime_ns, mtime_ns)`` to give the new file, e.g. to keep a
            timestamp that carries meaning across a rewrite.

    Raises:
        OSError: nothing was changed; the temporary file is gone.
    """
    tmp = _write_temp(path, data, mode=mode, uid=uid, gid=gid, times_ns=times_ns, sync=sync)
    try:
        tmp.replace(path)
    except BaseException:
        _unlink_quietly(tmp)
        raise
    if sync:
        fsync_dir(path.parent)


def create_exclusive(
    path: Path,
    data: bytes,
    *,
    mode: int,
    uid: int | None = None,
    gid: int | None = None,
    times_ns: tuple[int, int] | None = None,
    sync: bool = True,
) -> None:
    """Create ``path`` with ``data`` atomically, failing if it already exists.

    Like :func:`atomic_write`, but the temporary file is hard-linked into place
    instead of renamed: ``link(2)`` fails with EEXIST rather than replacing,
    so of two writers creating the same path exactly one wins, and readers
    never see a partial file. (``rename`` would silently replace, and
    ``O_EXCL`` on the final path would expose the file while it is written.)
    The filesystem must support hard links (every local POSIX filesystem,
    tmpfs and NFS do).

    Raises:
        FileExistsError: ``path`` exists; nothing was changed.
        OSError: nothing was changed; the temporary file is gone.
    """
    tmp = _write_temp(path, data, mode=mode, uid=uid, gid=gid, times_ns=times_ns, sync=sync)
    try:
        os.link(tmp, path, follow_symlinks=False)
    finally:
        _unlink_quietly(tmp)
    if sync:
        fsync_dir(path.parent)


def _write_temp(
    path: Path,
    data: bytes,
    *,
    mode: int,
    uid: int | None,
    gid: int | None,
    times_ns: tuple[int, int] | None,
    sync: bool = True,
) -> Path:
    """Write ``data`` to a new private temporary file next to ``path``; return its path."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}{TEMP_SUFFIX}")
    # Created with the final mode (narrowed by umask at worst) and no content yet.
    fd = os.open(tmp, _TEMP_FLAGS, mode & 0o777)
    try:
        _fill(fd, data, mode=mode, uid=uid, gid=gid, times_ns=times_ns, sync=sync)
    except BaseException:
        _unlink_quietly(tmp)
        raise
    return tmp


def _fill(
    fd: int,
    data: bytes,
    *,
    mode: int,
    uid: int | None,
    gid: int | None,
    times_ns: tuple[int, int] | None = None,
    sync: bool = True,
) -> None:
    """Give a new, empty temporary file its mode and owner, then ``data``; fsync; close it."""
    try:
        # fchmod before fchown: once the file belongs to someone else, only
        # CAP_FOWNER could still change its mode, and a hardened agent may
        # hold CAP_CHOWN alone. (The umask may have narrowed the mode.)
        os.fchmod(fd, mode)
        if uid is not None or gid is not None:
            os.fchown(fd, -1 if uid is None else uid, -1 if gid is None else gid)
            if mode & 0o6000:  # chown cleared set-id bits; needs CAP_FOWNER anyway
                os.fchmod(fd, mode)
        _write_all(fd, data)
        if times_ns is not None:
            os.utime(fd, ns=times_ns)
        if sync:
            os.fsync(fd)
    finally:
        os.close(fd)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _unlink_quietly(path: Path) -> None:
    path.unlink(missing_ok=True)


def atomic_write_at(
    dir_fd: int,
    name: str,
    data: bytes,
    *,
    mode: int,
    uid: int | None = None,
    gid: int | None = None,
) -> None:
    """:func:`atomic_write` of ``name`` relative to a checked directory descriptor.

    The temporary file is created ``O_EXCL | O_NOFOLLOW`` and renamed with
    ``renameat``, both relative to ``dir_fd``: a swap of the directory's path
    after it was checked cannot redirect the write.
    """
    tmp = f".{name}.{secrets.token_hex(6)}{TEMP_SUFFIX}"
    fd = os.open(tmp, _TEMP_FLAGS, mode & 0o777, dir_fd=dir_fd)
    try:
        _fill(fd, data, mode=mode, uid=uid, gid=gid)
        os.replace(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp, dir_fd=dir_fd)
        raise
    fsync_fd(dir_fd)


def fsync_fd(dir_fd: int) -> None:
    """fsync a directory descriptor (skipped for an ``O_PATH`` one, which cannot)."""
    try:
        os.fsync(dir_fd)
    except OSError as exc:
        if exc.errno != errno.EBADF:
            raise
