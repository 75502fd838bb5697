"""Writing rendered output: minimal atomic writes, the ``files`` directory swap,
the tmpfs guard and the start-up probe.

A file is rewritten only when its bytes, mode or owner differ, so an unchanged
render leaves inode and mtime alone. The ``files`` format writes a new
timestamped directory and swaps a ``..data`` symlink to it with one rename,
as Kubernetes' AtomicWriter does, so a reader of ``<dest>/<key>`` (a symlink
through ``..data``) always sees one complete generation.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import grp
import os
import pwd
import shutil
import stat
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from agent import fsutil
from agent.render.formats import RenderError

TMPFS_MAGIC = 0x01021994
RAMFS_MAGIC = 0x858458F6
_DATA = "..data"


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


def check_destination(dest: Path, *, allow_disk: bool, allowed_dirs: Sequence[Path]) -> None:
    """Refuse a destination that is a symlink, outside ``allowed_dirs``, or on disk.

    Raises:
        RenderError: with the reason and the fix.
    """
    if allowed_dirs and not any(dest.is_relative_to(d) for d in allowed_dirs):
        raise RenderError(
            f"{dest} is outside render.allowed_dirs ({', '.join(str(d) for d in allowed_dirs)})"
        )
    if dest.is_symlink():
        raise RenderError(f"{dest} is a symlink; refusing to write through it")
    parent = dest.parent
    if not parent.is_dir():
        raise RenderError(f"directory {parent} does not exist")
    if allow_disk:
        return
    fstype = filesystem_type(parent)
    if fstype not in (TMPFS_MAGIC, RAMFS_MAGIC):
        raise RenderError(
            f"{parent} is not on tmpfs or ramfs (filesystem type {fstype:#x}): a secret written "
            "there reaches the disk. Use a tmpfs (e.g. /dev/shm, /run, an emptyDir with "
            "medium: Memory) or set allow_disk: true for this template"
        )


def probe(dest: Path) -> None:
    """Create and remove a temporary file beside ``dest`` (fail at start, not at rotation)."""
    tmp = dest.parent / f".{dest.name}.probe{fsutil.TEMP_SUFFIX}"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        os.close(fd)
        os.unlink(tmp)
    except OSError as exc:
        raise RenderError(f"cannot write in {dest.parent}: {exc.strerror}") from None


def remove_stale_temps(dest: Path) -> int:
    """Remove temporary files a crash left beside ``dest``; return how many."""
    removed = 0
    prefix = f".{dest.name}."
    try:
        entries = list(os.scandir(dest.parent))
    except OSError:
        return 0
    for entry in entries:
        if entry.name.startswith(prefix) and fsutil.is_temp_name(entry.name):
            try:
                os.unlink(entry.path)
                removed += 1
            except OSError:
                pass
    return removed


def write_file(dest: Path, data: bytes, *, mode: int, owner: Owner) -> bool:
    """Write ``dest`` if its bytes, mode or owner differ; return whether it was written."""
    try:
        st = dest.lstat()
    except FileNotFoundError:
        st = None
    if st is not None and stat.S_ISLNK(st.st_mode):
        raise RenderError(f"{dest} is a symlink; refusing to write through it")
    if st is not None and stat.S_ISREG(st.st_mode) and _same(dest, st, data, mode, owner):
        return False
    fsutil.atomic_write(dest, data, mode=mode, uid=owner.uid, gid=owner.gid)
    return True


def _same(dest: Path, st: os.stat_result, data: bytes, mode: int, owner: Owner) -> bool:
    if stat.S_IMODE(st.st_mode) != mode or st.st_size != len(data):
        return False
    if owner.uid is not None and st.st_uid != owner.uid:
        return False
    if owner.gid is not None and st.st_gid != owner.gid:
        return False
    try:
        current, _ = fsutil.read_nofollow(dest)
    except OSError:
        return False
    return current == data


def write_files(dest: Path, files: Mapping[str, bytes], *, mode: int, owner: Owner) -> bool:
    """Swap in a new generation of ``files`` under ``dest`` if anything differs."""
    if dest.is_symlink():
        raise RenderError(f"{dest} is a symlink; refusing to write through it")
    dest.mkdir(mode=0o711, exist_ok=True)
    data_link = dest / _DATA
    if _generation_matches(data_link, files, mode, owner):
        return False
    gen = dest / f"..{time.strftime('%Y_%m_%d_%H_%M_%S')}.{os.urandom(4).hex()}"
    gen.mkdir(mode=0o711)
    try:
        for name, data in files.items():
            fsutil.atomic_write(gen / name, data, mode=mode, uid=owner.uid, gid=owner.gid)
        tmp_link = dest / f".{_DATA}.{os.urandom(4).hex()}{fsutil.TEMP_SUFFIX}"
        os.symlink(gen.name, tmp_link)
        old = os.readlink(data_link) if data_link.is_symlink() else None
        os.replace(tmp_link, data_link)  # the one atomic switch
    except BaseException:
        shutil.rmtree(gen, ignore_errors=True)
        raise
    for name in files:
        link = dest / name
        if not link.is_symlink():
            os.symlink(f"{_DATA}/{name}", link)
    for entry in os.scandir(dest):
        if entry.is_symlink() and not entry.name.startswith("..") and entry.name not in files:
            os.unlink(entry.path)
    if old and old != gen.name:
        shutil.rmtree(dest / old, ignore_errors=True)
    fsutil.fsync_dir(dest)
    return True


def _generation_matches(
    data_link: Path, files: Mapping[str, bytes], mode: int, owner: Owner
) -> bool:
    if not data_link.is_symlink():
        return False
    gen = data_link.parent / os.readlink(data_link)
    try:
        present = {e.name for e in os.scandir(gen)}
    except OSError:
        return False
    if present != set(files):
        return False
    for name, data in files.items():
        path = gen / name
        if not _same(path, path.lstat(), data, mode, owner):
            return False
    return True


def remove_output(dest: Path, *, files_format: bool) -> None:
    """Remove what a template wrote (cleanup_on_exit)."""
    if files_format:
        shutil.rmtree(dest, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            dest.unlink()
