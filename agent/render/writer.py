"""Writing rendered output: minimal atomic writes, the ``files`` directory swap,
the tmpfs guard and the start-up probe.

A file is rewritten only when its bytes, mode or owner differ, so an unchanged
render leaves inode and mtime alone. The checks of a destination and the
probe live in :mod:`agent.render.destination`, the ``files`` format's
generation swap in :mod:`agent.render.generations`; the renderer uses them
all through this module.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
from collections.abc import Sequence
from pathlib import Path

from agent import fsutil
from agent.render.destination import (
    RAMFS_MAGIC,
    TMPFS_MAGIC,
    CheckedDir,
    Owner,
    check_destination,
    filesystem_type,
    lstat_at,
    probe,
    resolve_owner,
    unchanged,
)
from agent.render.formats import RenderError
from agent.render.generations import current_generation, remove_old_generations, write_files

__all__ = [
    "RAMFS_MAGIC",
    "TMPFS_MAGIC",
    "Owner",
    "check_destination",
    "filesystem_type",
    "probe",
    "remove_output",
    "remove_stale_temps",
    "resolve_owner",
    "write_file",
    "write_files",
]


def remove_stale_temps(dest: Path, *, directory: bool = False) -> int:
    """Remove what a crash can leave behind for ``dest``; return how many entries.

    That is our temporary files beside ``dest`` (``.<name>.<random>.tmp``)
    and, for a ``files`` directory, temporary files and symlinks inside it and
    generation directories that ``..data`` does not point to. Runs relative
    to checked descriptors only (an unsafe directory is left alone here and
    refused by the checks that follow).
    """
    removed = 0
    with contextlib.suppress(RenderError, OSError), CheckedDir(dest.parent) as parent_fd:
        removed += _remove_temps(parent_fd, prefix=f".{dest.name}.")
        st = lstat_at(parent_fd, dest.name)
        if directory and st is not None and stat.S_ISDIR(st.st_mode):
            dest_fd = fsutil.open_checked_dir(dest, what="render directory")
            try:
                removed += _remove_temps(dest_fd, prefix=".")
                removed += remove_old_generations(dest_fd, keep=current_generation(dest_fd, dest))
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
    with CheckedDir(dest.parent, shared_volumes) as dir_fd:
        st = lstat_at(dir_fd, dest.name)
        if st is not None and stat.S_ISLNK(st.st_mode):
            raise RenderError(f"{dest} is a symlink; refusing to write through it")
        if st is not None and not stat.S_ISREG(st.st_mode):
            raise RenderError(f"{dest} exists and is not a regular file")
        if st is not None and unchanged(dir_fd, dest.name, st, data, mode, owner):
            return False
        fsutil.atomic_write_at(dir_fd, dest.name, data, mode=mode, uid=owner.uid, gid=owner.gid)
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
