"""Where rendered output may go: destination checks, checked directories, the probe.

A destination must be inside ``render.allowed_dirs``, not a symlink, on tmpfs
or ramfs unless ``allow_disk``, and in a directory no other user could swap
things in (:func:`agent.fsutil.open_checked_dir`). Every write then goes
relative to a :class:`CheckedDir` descriptor, never a path.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import grp
import os
import pwd
import secrets
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from agent import fsutil
from agent.render.formats import RenderError

TMPFS_MAGIC = 0x01021994
RAMFS_MAGIC = 0x858458F6


@dataclass(frozen=True, slots=True)
class Owner:
    """Resolved owner and group ids (None: leave as created)."""

    uid: int | None = None
    gid: int | None = None


def resolve_owner(owner: str | int | None, group: str | int | None) -> Owner:
    """Turn user and group names into ids (raises RenderError naming the unknown one)."""
    uid = gid = None
    try:
        if owner is not None:
            uid = owner if isinstance(owner, int) else pwd.getpwnam(owner).pw_uid
        if group is not None:
            gid = group if isinstance(group, int) else grp.getgrnam(group).gr_gid
    except KeyError:
        raise RenderError(f"unknown owner or group: {owner!r}/{group!r}") from None
    return Owner(uid, gid)


class _StatFs(ctypes.Structure):
    _fields_ = [("f_type", ctypes.c_long), ("_rest", ctypes.c_byte * 120)]


_libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)


def filesystem_type(path: Path) -> int:
    """``statfs(2)`` f_type of the filesystem holding ``path``."""
    buf = _StatFs()
    if _libc.statfs(os.fsencode(path), ctypes.byref(buf)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), str(path))
    return int(buf.f_type) & 0xFFFFFFFF


def check_destination(
    dest: Path,
    *,
    allow_disk: bool,
    allowed_dirs: Sequence[Path],
    directory: bool = False,
    shared_volumes: Sequence[Path] = (),
) -> None:
    """Refuse a destination that is a symlink, outside ``allowed_dirs``, on disk, or in
    a directory another user could swap things in.

    Args:
        directory: the destination is a directory (``files`` format). If it
            exists, its own filesystem is checked: it may be a tmpfs mount
            point (an ``emptyDir``) inside a directory on disk.
        shared_volumes: directories others in the same trust boundary may write
            to (a pod's ``emptyDir``); the agent creates its own subdirectory there.

    Raises:
        RenderError: with the reason and the fix.
    """
    if allowed_dirs:
        # Resolve the parent: a symlinked directory must not lead out of the allowed ones.
        real = Path(os.path.realpath(dest.parent)) / dest.name
        if not any(real.is_relative_to(os.path.realpath(d)) for d in allowed_dirs):
            raise RenderError(
                f"{dest} is outside render.allowed_dirs ({', '.join(str(d) for d in allowed_dirs)})"
            )
    with CheckedDir(dest.parent, shared_volumes) as parent_fd:
        st = lstat_at(parent_fd, dest.name)
        if st is not None and stat.S_ISLNK(st.st_mode):
            raise RenderError(f"{dest} is a symlink; refusing to write through it")
        if st is not None and directory and not stat.S_ISDIR(st.st_mode):
            raise RenderError(f"{dest} exists and is not a directory (format 'files' needs one)")
        if st is not None and not directory and not stat.S_ISREG(st.st_mode):
            raise RenderError(f"{dest} exists and is not a regular file")
        if st is not None and directory:
            _check_files_dir(dest, st)
    if not allow_disk:
        _check_memory_backed(dest if st is not None and directory else dest.parent)


class CheckedDir:
    """A checked descriptor of ``path`` (see :func:`fsutil.open_checked_dir`), closed on exit.

    Sticky shared directories (``/dev/shm``) are accepted for single files. A
    directory listed in ``shared_volumes`` is never written in directly: the
    agent creates (0711) and verifies its own subdirectory there.
    """

    def __init__(self, path: Path, shared_volumes: Sequence[Path] = ()) -> None:
        self.path = path
        self.shared_parent = _in_shared(path.parent, shared_volumes)
        self.fd = -1

    def __enter__(self) -> int:
        try:
            self.fd = fsutil.open_checked_dir(
                self.path,
                shared_ok=True,
                shared_parent_ok=self.shared_parent,
                create_mode=0o711 if self.shared_parent else None,
                what="render directory",
            )
        except fsutil.UnsafeDirectory as exc:
            raise RenderError(exc.message) from None
        except FileNotFoundError:
            raise RenderError(f"directory {self.path} does not exist") from None
        except NotADirectoryError:
            raise RenderError(f"{self.path} is not a directory") from None
        return self.fd

    def __exit__(self, *exc: object) -> None:
        os.close(self.fd)


def _in_shared(path: Path, shared_volumes: Sequence[Path]) -> bool:
    real = os.path.realpath(path)
    return any(real == os.path.realpath(v) for v in shared_volumes)


def lstat_at(dir_fd: int, name: str) -> os.stat_result | None:
    try:
        return os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return None


def _check_files_dir(dest: Path, st: os.stat_result) -> None:
    """A ``files`` destination is ours alone: owned by us or root, writable by no one else."""
    try:
        fsutil.check_directory(dest, st, shared_ok=False, what="render directory")
    except fsutil.UnsafeDirectory as exc:
        raise RenderError(exc.message) from None


def _check_memory_backed(directory: Path) -> None:
    fstype = filesystem_type(directory)
    if fstype not in (TMPFS_MAGIC, RAMFS_MAGIC):
        raise RenderError(
            f"{directory} is not on tmpfs or ramfs (filesystem type {fstype:#x}): a secret "
            "written there reaches the disk. Use a tmpfs (e.g. /dev/shm, /run, an emptyDir with "
            "medium: Memory) or set allow_disk: true for this template"
        )


def probe(
    dest: Path,
    *,
    owner: Owner = Owner(),
    directory: bool = False,
    shared_volumes: Sequence[Path] = (),
) -> None:
    """Create (and chown) then remove a temporary file where ``dest`` will be written.

    So an unwritable directory or an owner the agent may not give files to
    fails at start, not at the first rotation.
    """
    where = dest if directory and dest.is_dir() else dest.parent
    name = f".{dest.name}.probe.{secrets.token_hex(4)}{fsutil.TEMP_SUFFIX}"
    with CheckedDir(where, shared_volumes) as dir_fd:
        try:
            fd = os.open(
                name,
                os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                0o600,
                dir_fd=dir_fd,
            )
        except OSError as exc:
            hint = ""
            if isinstance(exc, PermissionError) or exc.errno == errno.EROFS:
                hint = ": " + fsutil.explain_denied(where, write=True)
            raise RenderError(f"cannot write in {where}: {exc.strerror}{hint}") from None
        try:
            if owner.uid is not None or owner.gid is not None:
                os.fchown(
                    fd,
                    -1 if owner.uid is None else owner.uid,
                    -1 if owner.gid is None else owner.gid,
                )
        except OSError as exc:
            raise RenderError(
                f"cannot give files to owner {owner.uid}/group {owner.gid}: {exc.strerror} "
                "(the agent needs CAP_CHOWN, or drop owner/group)"
            ) from None
        finally:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(name, dir_fd=dir_fd)


def unchanged(
    dir_fd: int, name: str, st: os.stat_result, data: bytes, mode: int, owner: Owner
) -> bool:
    """Whether the file ``name`` (whose lstat is ``st``) already has these bytes, mode and owner."""
    if stat.S_IMODE(st.st_mode) != mode or st.st_size != len(data):
        return False
    if owner.uid is not None and st.st_uid != owner.uid:
        return False
    if owner.gid is not None and st.st_gid != owner.gid:
        return False
    try:
        fd = os.open(
            name, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=dir_fd
        )
    except OSError:
        return False
    try:
        chunks = []
        while chunk := os.read(fd, 1 << 16):
            chunks.append(chunk)
    except OSError:
        return False
    finally:
        os.close(fd)
    return b"".join(chunks) == data
