"""Crash-safe file writes and inter-process locks, shared by the file store and rendering.

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
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import os
import pwd
import secrets
import stat
import sys
from pathlib import Path
from types import TracebackType

from agent.bounded import read_fd_capped

__all__ = [
    "TEMP_SUFFIX",
    "FileLock",
    "UnsafeDirectory",
    "atomic_write",
    "atomic_write_at",
    "check_directory",
    "create_exclusive",
    "describe",
    "fsync_dir",
    "is_temp_name",
    "make_dirs",
    "open_checked_dir",
    "read_nofollow",
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
    tmp = _write_temp(path, data, mode=mode, uid=uid, gid=gid, times_ns=times_ns)
    try:
        tmp.replace(path)
    except BaseException:
        _unlink_quietly(tmp)
        raise
    fsync_dir(path.parent)


def create_exclusive(
    path: Path,
    data: bytes,
    *,
    mode: int,
    uid: int | None = None,
    gid: int | None = None,
    times_ns: tuple[int, int] | None = None,
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
    tmp = _write_temp(path, data, mode=mode, uid=uid, gid=gid, times_ns=times_ns)
    try:
        os.link(tmp, path, follow_symlinks=False)
    finally:
        _unlink_quietly(tmp)
    fsync_dir(path.parent)


def _write_temp(
    path: Path,
    data: bytes,
    *,
    mode: int,
    uid: int | None,
    gid: int | None,
    times_ns: tuple[int, int] | None,
) -> Path:
    """Write ``data`` to a new private temporary file next to ``path``; return its path."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}{TEMP_SUFFIX}")
    # Created with the final mode (narrowed by umask at worst) and no content yet.
    fd = os.open(tmp, _TEMP_FLAGS, mode & 0o777)
    try:
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
            os.fsync(fd)
        finally:
            os.close(fd)
    except BaseException:
        _unlink_quietly(tmp)
        raise
    return tmp


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _unlink_quietly(path: Path) -> None:
    path.unlink(missing_ok=True)


class FileLock:
    """An exclusive ``flock(2)`` on a lock file, between processes and threads.

    Each instance opens the lock file itself, so two instances exclude each
    other even within one process (flock locks belong to the open file
    description). Not reentrant. Use ``with`` from threads, ``async with``
    from the event loop (the blocking acquisition runs in a worker thread).

    The lock file is created with ``mode`` if missing and is never removed:
    unlinking it while another process waits on it would let two holders in.

    Kept instead of the ``filelock`` package (issue 15), on reasoning: its
    crash semantics are the same (both use ``flock``, which the kernel drops
    when the holder dies), but its blocking ``acquire`` polls ``LOCK_NB``
    every ``poll_interval`` (50 ms by default) instead of sleeping in the
    kernel's queue. Stage moves are short and contended when several agents
    rotate at once, and the propagation target is under 100 ms p99, so a
    50 ms poll step would cost a visible share of it; the kernel also wakes
    a waiter at once. Its async lock runs in a thread like this one, and its
    reentrancy (a count per object) is a feature we do not want: a second
    acquire here is a bug and raises.
    """

    def __init__(self, path: Path, *, mode: int = 0o600) -> None:
        self.path = path
        self.mode = mode
        self._fd: int | None = None

    @property
    def locked(self) -> bool:
        """Whether this instance holds the lock."""
        return self._fd is not None

    def acquire(self, *, blocking: bool = True) -> bool:
        """Take the lock; with ``blocking=False`` return False instead of waiting."""
        if self._fd is not None:
            raise RuntimeError(f"lock {self.path} is already held by this FileLock")
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, self.mode)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if blocking else fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        return True

    def release(self) -> None:
        """Drop the lock (closing the descriptor releases the flock)."""
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)

    def __enter__(self) -> FileLock:
        self.acquire()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()

    async def __aenter__(self) -> FileLock:
        loop = asyncio.get_running_loop()
        future = loop.run_in_executor(None, self.acquire)
        try:
            # Shielded: a cancelled waiter must not leave a worker thread that
            # later takes the lock with nobody left to release it.
            await asyncio.shield(future)
        except asyncio.CancelledError:
            future.add_done_callback(self._release_if_acquired)
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()

    def _release_if_acquired(self, future: asyncio.Future[bool]) -> None:
        if not future.cancelled() and future.exception() is None:
            self.release()


# ------------------------------------------------------------------ ownership
#
# Every directory the agent writes into or serves from must belong to the
# agent's uid or root and be writable by nobody else, or another local user
# could swap a file, a socket or a whole directory under it. The check walks the
# real path from "/" with O_NOFOLLOW, one component at a time relative to the
# descriptor of the one before, and hands back a descriptor of the checked
# directory: every write then goes relative to that descriptor, so a rename or
# symlink swap after the check cannot redirect it.

_DIR_FLAGS = os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class UnsafeDirectory(Exception):
    """A directory fails the ownership check; ``message`` names path, owner, mode and fix."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


def describe(path: Path | str, st: os.stat_result) -> str:
    """``/x (owner nobody uid 65534, mode 0755)`` for error messages."""
    try:
        user = pwd.getpwuid(st.st_uid).pw_name
    except KeyError:
        user = "?"
    return f"{path} (owner {user} uid {st.st_uid}, mode {stat.S_IMODE(st.st_mode):04o})"


def _trusted_owner(st: os.stat_result) -> bool:
    return st.st_uid in (0, os.geteuid())


def check_directory(
    path: Path | str, st: os.stat_result, *, shared_ok: bool, what: str = "directory"
) -> None:
    """Raise :class:`UnsafeDirectory` unless ``st`` (of ``path``) is safe to write under.

    Args:
        shared_ok: others may write in it if it is sticky (they can then
            create entries but not rename or remove ours), e.g. ``/tmp`` as a
            parent, or ``/dev/shm`` for a single rendered file.
    """
    me = os.geteuid()
    if not stat.S_ISDIR(st.st_mode):
        raise UnsafeDirectory(f"{what} {path} is not a directory")
    if not _trusted_owner(st):
        who = "root" if me == 0 else f"uid {me} or root"
        raise UnsafeDirectory(
            f"{what} {describe(path, st)} is not owned by {who}: its owner could swap what "
            f"the agent writes there. Fix: chown {'root' if me == 0 else me} {path} "
            "(or remove it and let the agent create it), or choose a directory the agent owns"
        )
    writable = st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
    if writable and not (shared_ok and st.st_mode & stat.S_ISVTX):
        raise UnsafeDirectory(
            f"{what} {describe(path, st)} is writable by group or others: they could swap "
            f"what the agent writes there. Fix: chmod go-w {path}, or use a subdirectory "
            "that the agent creates itself"
        )


def open_checked_dir(
    path: Path,
    *,
    create_mode: int | None = None,
    shared_ok: bool = False,
    shared_parent_ok: bool = False,
    what: str = "directory",
) -> int:
    """Open ``path`` (a directory) after checking it and every ancestor; return the fd.

    Ancestors must be owned by the agent's uid or root and, if writable by
    others, sticky (``/tmp``, ``/dev/shm``); ``shared_parent_ok`` also accepts
    a world-writable, non-sticky direct parent (a Kubernetes ``emptyDir``
    the config names a shared volume), because the directory itself is then
    created and verified by the agent. ``path`` itself follows
    :func:`check_directory` with ``shared_ok``.

    Args:
        create_mode: create ``path`` with this mode if missing (its parent
            must exist); a directory the agent creates is owned by it.

    Returns:
        An ``O_RDONLY`` descriptor of the directory (``O_PATH`` where the
        agent may not read it); the caller closes it.

    Raises:
        UnsafeDirectory: naming the offending path, its owner and mode, and the fix.
        FileNotFoundError: ``path`` or an ancestor does not exist.
    """
    real = Path(os.path.realpath(path))
    parts = real.parts[1:]
    fd = os.open("/", os.O_PATH | _DIR_FLAGS)
    try:
        current = Path("/")
        check_directory(current, os.fstat(fd), shared_ok=True, what="ancestor directory")
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            current = current / part
            if last and create_mode is not None:
                _mkdir_at(fd, part, create_mode)
            nxt = _open_dir_at(fd, part, current, final=last)
            os.close(fd)
            fd = nxt
            st = os.fstat(fd)
            if last:
                check_directory(current, st, shared_ok=shared_ok, what=what)
            elif not (shared_parent_ok and i == len(parts) - 2 and _trusted_owner(st)):
                check_directory(current, st, shared_ok=True, what="ancestor directory")
        return fd
    except BaseException:
        os.close(fd)
        raise


def _mkdir_at(dir_fd: int, name: str, mode: int) -> None:
    try:
        os.mkdir(name, mode, dir_fd=dir_fd)
    except FileExistsError:
        return  # checked like any existing directory
    # Exactly ``mode``, whatever the umask; fchmod on a no-follow descriptor.
    sub = os.open(name, os.O_RDONLY | _DIR_FLAGS, dir_fd=dir_fd)
    try:
        os.fchmod(sub, mode)
    finally:
        os.close(sub)


def _open_dir_at(dir_fd: int, name: str, path: Path, *, final: bool) -> int:
    try:
        if final:
            try:
                return os.open(name, os.O_RDONLY | _DIR_FLAGS, dir_fd=dir_fd)
            except PermissionError:
                pass
        return os.open(name, os.O_PATH | _DIR_FLAGS, dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            raise UnsafeDirectory(
                f"{path} changed into a symlink or non-directory while the agent checked it; "
                "refusing to follow it"
            ) from None
        raise


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
        try:
            os.fchmod(fd, mode)
            if uid is not None or gid is not None:
                os.fchown(fd, -1 if uid is None else uid, -1 if gid is None else gid)
                if mode & 0o6000:
                    os.fchmod(fd, mode)
            _write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
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
