"""The ``files`` format: a directory of one file per key, swapped in whole.

Each render that changes anything writes a new timestamped generation
directory and swaps a ``..data`` symlink to it with one rename, as
Kubernetes' AtomicWriter does, so a reader of ``<dest>/<key>`` (a symlink
through ``..data``) always sees one complete generation.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import stat
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from agent import fsutil
from agent.render.destination import CheckedDir, Owner, lstat_at, unchanged
from agent.render.formats import RenderError

_DATA = "..data"
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


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
    with CheckedDir(dest.parent, shared_volumes) as parent_fd:
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
    current = current_generation(dest_fd, dest)
    if current is not None and _generation_matches(dest_fd, current, files, mode, owner):
        return _link_keys(dest_fd, files)
    stamp = time.strftime("%Y_%m_%d_%H_%M_%S", time.gmtime())
    gen = f"..{stamp}.{secrets.token_hex(4)}"
    tmp_link = f".{_DATA}.{secrets.token_hex(4)}{fsutil.TEMP_SUFFIX}"
    os.mkdir(gen, 0o711, dir_fd=dest_fd)
    try:
        gen_fd = os.open(gen, _DIR_FLAGS, dir_fd=dest_fd)
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
    remove_old_generations(dest_fd, keep=gen)
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


def current_generation(dest_fd: int, dest: Path) -> str | None:
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


def remove_old_generations(dest_fd: int, *, keep: str | None) -> int:
    """Remove every generation directory but ``keep``; return how many."""
    removed = 0
    for name in _scandir_at(dest_fd):
        if name.startswith("..") and name not in (_DATA, keep):
            st = lstat_at(dest_fd, name)
            if st is not None and stat.S_ISDIR(st.st_mode):
                _rmtree_at(dest_fd, name)
                removed += 1
    return removed


def _generation_matches(
    dest_fd: int, gen: str, files: Mapping[str, bytes], mode: int, owner: Owner
) -> bool:
    try:
        gen_fd = os.open(gen, _DIR_FLAGS, dir_fd=dest_fd)
    except OSError:
        return False
    try:
        if set(os.listdir(gen_fd)) != set(files):
            return False
        for name, data in files.items():
            st = lstat_at(gen_fd, name)
            if st is None or not unchanged(gen_fd, name, st, data, mode, owner):
                return False
        return True
    finally:
        os.close(gen_fd)
