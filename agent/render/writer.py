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
import secrets
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


def check_destination(
    dest: Path, *, allow_disk: bool, allowed_dirs: Sequence[Path], directory: bool = False
) -> None:
    """Refuse a destination that is a symlink, outside ``allowed_dirs``, or on disk.

    Args:
        directory: the destination is a directory (``files`` format). If it
            exists, its own filesystem is checked: it may be a tmpfs mount
            point (an ``emptyDir``) inside a directory on disk.

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
    try:
        st: os.stat_result | None = dest.lstat()
    except FileNotFoundError:
        st = None
    if st is not None and stat.S_ISLNK(st.st_mode):
        raise RenderError(f"{dest} is a symlink; refusing to write through it")
    if st is not None and directory and not stat.S_ISDIR(st.st_mode):
        raise RenderError(f"{dest} exists and is not a directory (format 'files' needs one)")
    if st is not None and not directory and not stat.S_ISREG(st.st_mode):
        raise RenderError(f"{dest} exists and is not a regular file")
    parent = dest.parent
    if not parent.is_dir():
        raise RenderError(f"directory {parent} does not exist")
    if not allow_disk:
        _check_memory_backed(dest if st is not None and directory else parent)


def _check_memory_backed(directory: Path) -> None:
    fstype = filesystem_type(directory)
    if fstype not in (TMPFS_MAGIC, RAMFS_MAGIC):
        raise RenderError(
            f"{directory} is not on tmpfs or ramfs (filesystem type {fstype:#x}): a secret "
            "written there reaches the disk. Use a tmpfs (e.g. /dev/shm, /run, an emptyDir with "
            "medium: Memory) or set allow_disk: true for this template"
        )


def probe(dest: Path, *, owner: Owner = Owner(), directory: bool = False) -> None:
    """Create (and chown) then remove a temporary file where ``dest`` will be written.

    So an unwritable directory or an owner the agent may not give files to
    fails at start, not at the first rotation.
    """
    where = dest if directory and dest.is_dir() else dest.parent
    tmp = where / f".{dest.name}.probe.{secrets.token_hex(4)}{fsutil.TEMP_SUFFIX}"
    try:
        fd = os.open(
            tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600
        )
    except OSError as exc:
        raise RenderError(f"cannot write in {where}: {exc.strerror}") from None
    try:
        if owner.uid is not None or owner.gid is not None:
            os.fchown(
                fd, -1 if owner.uid is None else owner.uid, -1 if owner.gid is None else owner.gid
            )
    except OSError as exc:
        raise RenderError(
            f"cannot give files to owner {owner.uid}/group {owner.gid}: {exc.strerror} "
            "(the agent needs CAP_CHOWN, or drop owner/group)"
        ) from None
    finally:
        os.close(fd)
        tmp.unlink(missing_ok=True)


def remove_stale_temps(dest: Path, *, directory: bool = False) -> int:
    """Remove what a crash can leave behind for ``dest``; return how many entries.

    That is our temporary files beside ``dest`` (``.<name>.<random>.tmp``)
    and, for a ``files`` directory, temporary files and symlinks inside it and
    generation directories that ``..data`` does not point to.
    """
    removed = _remove_temps(dest.parent, prefix=f".{dest.name}.")
    if directory and dest.is_dir() and not dest.is_symlink():
        removed += _remove_temps(dest, prefix=".")
        removed += _remove_old_generations(dest, keep=_current_generation(dest))
    return removed


def _remove_temps(directory: Path, *, prefix: str) -> int:
    removed = 0
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return 0
    for entry in entries:
        if entry.name.startswith(prefix) and fsutil.is_temp_name(entry.name):
            with contextlib.suppress(OSError):
                os.unlink(entry.path)
                removed += 1
    return removed


def write_file(dest: Path, data: bytes, *, mode: int, owner: Owner) -> bool:
    """Write ``dest`` if its bytes, mode or owner differ; return whether it was written."""
    try:
        st = dest.lstat()
    except FileNotFoundError:
        st = None
    if st is not None and stat.S_ISLNK(st.st_mode):
        raise RenderError(f"{dest} is a symlink; refusing to write through it")
    if st is not None and not stat.S_ISREG(st.st_mode):
        raise RenderError(f"{dest} exists and is not a regular file")
    if st is not None and _same(dest, st, data, mode, owner):
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
    """Swap in a new generation of ``files`` under ``dest`` if anything differs.

    The new generation is a fresh ``..<UTC time>.<random>`` directory; the
    one atomic step is renaming a new symlink over ``..data``. Then each
    ``<key>`` symlink (to ``..data/<key>``) is created or repaired, links of
    keys that went away are removed, and old generations are deleted.
    Returns whether anything changed.
    """
    _ensure_dir(dest)
    current = _current_generation(dest)
    if current is not None and _generation_matches(dest / current, files, mode, owner):
        return _link_keys(dest, files)
    stamp = time.strftime("%Y_%m_%d_%H_%M_%S", time.gmtime())
    gen = dest / f"..{stamp}.{secrets.token_hex(4)}"
    tmp_link = dest / f".{_DATA}.{secrets.token_hex(4)}{fsutil.TEMP_SUFFIX}"
    gen.mkdir(mode=0o711)
    try:
        for name, data in files.items():
            fsutil.atomic_write(gen / name, data, mode=mode, uid=owner.uid, gid=owner.gid)
        os.symlink(gen.name, tmp_link)
        os.replace(tmp_link, dest / _DATA)  # the one atomic switch
    except BaseException:
        tmp_link.unlink(missing_ok=True)
        shutil.rmtree(gen, ignore_errors=True)
        raise
    _link_keys(dest, files)
    _remove_old_generations(dest, keep=gen.name)
    fsutil.fsync_dir(dest)
    return True


def _ensure_dir(dest: Path) -> None:
    try:
        st = dest.lstat()
    except FileNotFoundError:
        dest.mkdir(mode=0o711)
        return
    if stat.S_ISLNK(st.st_mode):
        raise RenderError(f"{dest} is a symlink; refusing to write through it")
    if not stat.S_ISDIR(st.st_mode):
        raise RenderError(f"{dest} exists and is not a directory (format 'files' needs one)")


def _current_generation(dest: Path) -> str | None:
    """The generation ``..data`` points to (None if there is none yet)."""
    try:
        target = os.readlink(dest / _DATA)
    except FileNotFoundError:
        return None
    except OSError:
        raise RenderError(f"{dest / _DATA} exists and is not a symlink") from None
    return target if target.startswith("..") and "/" not in target else None


def _link_keys(dest: Path, files: Mapping[str, bytes]) -> bool:
    """Make each ``<key>`` a symlink to ``..data/<key>``; drop links of other keys."""
    changed = False
    for name in files:
        want = f"{_DATA}/{name}"
        link = dest / name
        try:
            if os.readlink(link) == want:
                continue
        except OSError:  # missing, or something else in the way: replace it
            pass
        tmp = dest / f".{name}.{secrets.token_hex(4)}{fsutil.TEMP_SUFFIX}"
        os.symlink(want, tmp)
        try:
            os.replace(tmp, link)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        changed = True
    for entry in os.scandir(dest):
        if entry.name in files or entry.name.startswith("..") or not entry.is_symlink():
            continue
        if os.readlink(entry.path).startswith(f"{_DATA}/"):
            os.unlink(entry.path)
            changed = True
    return changed


def _remove_old_generations(dest: Path, *, keep: str | None) -> int:
    removed = 0
    for entry in os.scandir(dest):
        name = entry.name
        stale = name.startswith("..") and name not in (_DATA, keep)
        if stale and entry.is_dir(follow_symlinks=False):
            shutil.rmtree(entry.path, ignore_errors=True)
            removed += 1
    return removed


def _generation_matches(gen: Path, files: Mapping[str, bytes], mode: int, owner: Owner) -> bool:
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
        if dest.is_dir() and not dest.is_symlink():
            shutil.rmtree(dest, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            if not dest.is_dir():
                dest.unlink()
