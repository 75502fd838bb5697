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
_READ_FLAGS = os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


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
    with _Dir(dest.parent, shared_volumes) as parent_fd:
        st = _lstat_at(parent_fd, dest.name)
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


class _Dir:
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


def _lstat_at(dir_fd: int, name: str) -> os.stat_result | None:
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
    with _Dir(where, shared_volumes) as dir_fd:
        try:
            fd = os.open(
                name,
                os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                0o600,
                dir_fd=dir_fd,
            )
        except OSError as exc:
            raise RenderError(f"cannot write in {where}: {exc.strerror}") from None
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


def remove_stale_temps(dest: Path, *, directory: bool = False) -> int:
    """Remove what a crash can leave behind for ``dest``; return how many entries.

    That is our temporary files beside ``dest`` (``.<name>.<random>.tmp``)
    and, for a ``files`` directory, temporary files and symlinks inside it and
    generation directories that ``..data`` does not point to. Runs relative
    to checked descriptors only (an unsafe directory is left alone here and
    refused by the checks that follow).
    """
    removed = 0
    with contextlib.suppress(RenderError, OSError), _Dir(dest.parent) as parent_fd:
        removed += _remove_temps(parent_fd, prefix=f".{dest.name}.")
        st = _lstat_at(parent_fd, dest.name)
        if directory and st is not None and stat.S_ISDIR(st.st_mode):
            dest_fd = fsutil.open_checked_dir(dest, what="render directory")
            try:
                removed += _remove_temps(dest_fd, prefix=".")
                removed += _remove_old_generations(dest_fd, keep=_current_generation(dest_fd, dest))
            finally:
                os.close(dest_fd)
    return removed


def _remove_temps(dir_fd: int, *, prefix: str) -> int:
    removed = 0
    for name in os.listdir(dir_fd):
        if name.startswith(prefix) and fsutil.is_temp_name(name):
            with contextlib.suppress(OSError):
                os.unlink(name, dir_fd=dir_fd)
                removed += 1
    return removed


def write_file(
    dest: Path, data: bytes, *, mode: int, owner: Owner, shared_volumes: Sequence[Path] = ()
) -> bool:
    """Write ``dest`` if its bytes, mode or owner differ; return whether it was written.

    Every step is relative to a checked descriptor of ``dest``'s directory.
    """
    with _Dir(dest.parent, shared_volumes) as dir_fd:
        st = _lstat_at(dir_fd, dest.name)
        if st is not None and stat.S_ISLNK(st.st_mode):
            raise RenderError(f"{dest} is a symlink; refusing to write through it")
        if st is not None and not stat.S_ISREG(st.st_mode):
            raise RenderError(f"{dest} exists and is not a regular file")
        if st is not None and _same(dir_fd, dest.name, st, data, mode, owner):
            return False
        fsutil.atomic_write_at(dir_fd, dest.name, data, mode=mode, uid=owner.uid, gid=owner.gid)
        return True


def _same(dir_fd: int, name: str, st: os.stat_result, data: bytes, mode: int, owner: Owner) -> bool:
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


def write_files(
    dest: Path,
    files: Mapping[str, bytes],
    *,
    mode: int,
    owner: Owner,
    shared_volumes: Sequence[Path] = (),
) -> bool:
    """Swap in a new generation of ``files`` under ``dest`` if anything differs.

    The new generation is a fresh ``..<UTC time>.<random>`` directory; the
    one atomic step is renaming a new symlink over ``..data``. Then each
    ``<key>`` symlink (to ``..data/<key>``) is created or repaired, links of
    keys that went away are removed, and old generations are deleted.
    Every step (mkdir, file writes, symlinks, renames, removals) is relative
    to a checked descriptor of ``dest`` or of the new generation, never a
    path, so a directory swapped for a symlink cannot redirect a write.
    Returns whether anything changed.
    """
    with _Dir(dest.parent, shared_volumes) as parent_fd:
        try:
            dest_fd = fsutil.open_checked_dir(dest, create_mode=0o711, what="render directory")
        except fsutil.UnsafeDirectory as exc:
            raise RenderError(exc.message) from None
        except NotADirectoryError:
            raise RenderError(
                f"{dest} exists and is not a directory (format 'files' needs one)"
            ) from None
        del parent_fd  # checked above; ``dest`` itself was opened and checked from "/"
    try:
        return _write_generation(dest_fd, dest, files, mode, owner)
    finally:
        os.close(dest_fd)


def _write_generation(
    dest_fd: int, dest: Path, files: Mapping[str, bytes], mode: int, owner: Owner
) -> bool:
    current = _current_generation(dest_fd, dest)
    if current is not None and _generation_matches(dest_fd, current, files, mode, owner):
        return _link_keys(dest_fd, files)
    stamp = time.strftime("%Y_%m_%d_%H_%M_%S", time.gmtime())
    gen = f"..{stamp}.{secrets.token_hex(4)}"
    tmp_link = f".{_DATA}.{secrets.token_hex(4)}{fsutil.TEMP_SUFFIX}"
    os.mkdir(gen, 0o711, dir_fd=dest_fd)
    try:
        gen_fd = os.open(
            gen, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dest_fd
        )
        try:
            if os.fstat(gen_fd).st_uid != os.geteuid():
                raise RenderError(f"{dest / gen} was replaced while it was written; refusing")
            for name, data in files.items():
                fsutil.atomic_write_at(gen_fd, name, data, mode=mode, uid=owner.uid, gid=owner.gid)
        finally:
            os.close(gen_fd)
        os.symlink(gen, tmp_link, dir_fd=dest_fd)
        os.replace(tmp_link, _DATA, src_dir_fd=dest_fd, dst_dir_fd=dest_fd)  # the one atomic switch
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp_link, dir_fd=dest_fd)
        _rmtree_at(dest_fd, gen)
        raise
    _link_keys(dest_fd, files)
    _remove_old_generations(dest_fd, keep=gen)
    fsutil.fsync_fd(dest_fd)
    return True


def _rmtree_at(dir_fd: int, name: str) -> None:
    """Remove ``name`` under ``dir_fd`` (a directory tree or a planted symlink), never following."""
    try:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except OSError:
        return
    with contextlib.suppress(OSError):
        if stat.S_ISDIR(st.st_mode):
            shutil.rmtree(name, dir_fd=dir_fd)
        else:
            os.unlink(name, dir_fd=dir_fd)


def _current_generation(dest_fd: int, dest: Path) -> str | None:
    """The generation ``..data`` points to (None if there is none yet)."""
    try:
        target = os.readlink(_DATA, dir_fd=dest_fd)
    except FileNotFoundError:
        return None
    except OSError:
        raise RenderError(f"{dest / _DATA} exists and is not a symlink") from None
    return target if target.startswith("..") and "/" not in target else None


def _link_keys(dest_fd: int, files: Mapping[str, bytes]) -> bool:
    """Make each ``<key>`` a symlink to ``..data/<key>``; drop links of other keys."""
    changed = False
    for name in files:
        want = f"{_DATA}/{name}"
        try:
            if os.readlink(name, dir_fd=dest_fd) == want:
                continue
        except OSError:  # missing, or something else in the way: replace it
            pass
        tmp = f".{name}.{secrets.token_hex(4)}{fsutil.TEMP_SUFFIX}"
        os.symlink(want, tmp, dir_fd=dest_fd)
        try:
            os.replace(tmp, name, src_dir_fd=dest_fd, dst_dir_fd=dest_fd)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp, dir_fd=dest_fd)
            raise
        changed = True
    for entry in _scandir_at(dest_fd):
        if entry in files or entry.startswith(".."):
            continue
        try:
            target = os.readlink(entry, dir_fd=dest_fd)
        except OSError:
            continue  # not a symlink
        if target.startswith(f"{_DATA}/"):
            os.unlink(entry, dir_fd=dest_fd)
            changed = True
    return changed


def _scandir_at(dir_fd: int) -> list[str]:
    return os.listdir(dir_fd)


def _remove_old_generations(dest_fd: int, *, keep: str | None) -> int:
    removed = 0
    for name in _scandir_at(dest_fd):
        if name.startswith("..") and name not in (_DATA, keep):
            st = _lstat_at(dest_fd, name)
            if st is not None and stat.S_ISDIR(st.st_mode):
                _rmtree_at(dest_fd, name)
                removed += 1
    return removed


def _generation_matches(
    dest_fd: int, gen: str, files: Mapping[str, bytes], mode: int, owner: Owner
) -> bool:
    try:
        gen_fd = os.open(
            gen, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dest_fd
        )
    except OSError:
        return False
    try:
        if set(os.listdir(gen_fd)) != set(files):
            return False
        for name, data in files.items():
            st = _lstat_at(gen_fd, name)
            if st is None or not _same(gen_fd, name, st, data, mode, owner):
                return False
        return True
    finally:
        os.close(gen_fd)


def remove_output(dest: Path, *, files_format: bool) -> None:
    """Remove what a template wrote (cleanup_on_exit)."""
    if files_format:
        if dest.is_dir() and not dest.is_symlink():
            shutil.rmtree(dest, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            if not dest.is_dir():
                dest.unlink()
