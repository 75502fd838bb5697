"""Ownership checks of the directories the agent writes into or serves from.

Every such directory must belong to the agent's uid or root and be writable by
nobody else, or another local user could swap a file, a socket or a whole
directory under it. The check walks the real path from "/" with O_NOFOLLOW, one
component at a time relative to the descriptor of the one before, and hands
back a descriptor of the checked directory: every write then goes relative to
that descriptor (:func:`agent.fsutil.atomic_write_at`), so a rename or symlink
swap after the check cannot redirect it. Re-exported by :mod:`agent.fsutil`.
"""

from __future__ import annotations

import errno
import os
import pwd
import stat
from pathlib import Path

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

    Symlinks on the way are followed only where no one else could have
    made or changed them (:func:`safe_realpath`).

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
    real = safe_realpath(path)
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


_MAX_LINKS = 40  # as the kernel's limit on symlinks followed in one lookup


def safe_realpath(path: Path | str) -> Path:
    """``os.path.realpath(path)``, following only symlinks no one else controls.

    A symlink is followed if the directory holding it belongs to the agent's
    uid or root and either no one else may write in it, or it is sticky and
    the link itself is the agent's or root's (others cannot replace it
    there). ``/var/run -> ../run`` passes; a link another user planted in
    ``/dev/shm`` or ``/tmp`` in place of a directory the agent would create
    (so that root writes where they choose) is refused. Missing components
    are kept as they are: they are created or reported later.

    Raises:
        UnsafeDirectory: naming the link, who owns it and the directory, and the fix.
    """
    pending = list(Path(os.path.join(os.getcwd(), path)).parts[1:])
    current = Path("/")
    links = 0
    while pending:
        part = pending.pop(0)
        if part in ("", "."):
            continue
        if part == "..":
            current = current.parent
            continue
        candidate = current / part
        try:
            st = os.lstat(candidate)
        except FileNotFoundError:
            current = candidate
            continue
        if not stat.S_ISLNK(st.st_mode):
            current = candidate
            continue
        _check_link(candidate, st, current)
        links += 1
        if links > _MAX_LINKS:
            raise UnsafeDirectory(f"{path}: too many levels of symbolic links")
        target = os.readlink(candidate)
        if target.startswith("/"):
            current = Path("/")
        pending = [p for p in Path(target).parts if p != "/"] + pending
    return current


def _check_link(link: Path, st: os.stat_result, directory: Path) -> None:
    dir_st = os.stat(directory)
    writable = dir_st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
    sticky = dir_st.st_mode & stat.S_ISVTX
    if _trusted_owner(dir_st) and (not writable or (sticky and _trusted_owner(st))):
        return
    try:
        user = pwd.getpwuid(st.st_uid).pw_name
    except KeyError:
        user = "?"
    raise UnsafeDirectory(
        f"{link} is a symlink (owner {user} uid {st.st_uid}) in {describe(directory, dir_st)}, "
        "where another user could have made it or can change it: following it would let them "
        "choose where the agent writes. Fix: name the real path in the config, or remove the "
        f"symlink and let the agent create {link}"
    )


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


def explain_denied(
    path: Path | str, *, write: bool, setting: str | None = None, fix: str | None = None
) -> str:
    """Why the agent's uid may not read ``path`` (or write in it), for an error message.

    Names the first path component that refuses access, its owner and mode
    (or that its file system is read-only), the agent's uid and gid, and the
    fix. ``write`` means creating entries in the directory ``path`` (or in its
    nearest existing ancestor); otherwise reading ``path``. ``setting`` is the
    config key that could point elsewhere; ``fix`` replaces the generic fix.
    """
    uid, gid = os.geteuid(), os.getegid()
    target = Path(os.path.abspath(path))
    found = _first_refusal(target, write=write)
    if found is None:
        return f"the agent runs as uid {uid} gid {gid}"
    culprit, verb = found
    elsewhere = f"; or set {setting} to a path the agent can use" if setting else ""
    if write and _read_only_fs(culprit):
        return (
            f"{culprit} is on a read-only file system. Fix: mount a writable volume there "
            f"(a tmpfs, or a Kubernetes emptyDir){elsewhere}"
        )
    try:
        what = describe(culprit, os.stat(culprit))
    except OSError:
        what = str(culprit)
    if fix is not None:
        return f"{what} does not let the agent (uid {uid} gid {gid}) {verb} it. Fix: {fix}"
    if write and not os.path.lexists(target) and verb == "write in":
        # Creating a missing directory in a system one (/, /run): make it, don't chown that.
        return (
            f"{what} does not let the agent (uid {uid} gid {gid}) create {target} in it. "
            f"Fix: mkdir -p {target} && chown {uid}:{gid} {target}{elsewhere}"
        )
    return (
        f"{what} does not let the agent (uid {uid} gid {gid}) {verb} it. "
        f"Fix: chown {uid}:{gid} {culprit} (Docker: --tmpfs <dir>:uid={uid},gid={gid}; "
        f"Kubernetes: securityContext.fsGroup: {gid}){elsewhere}"
    )


def denied_suffix(exc: OSError, path: Path | str | None = None, **kwargs: str) -> str:
    """``": <explain_denied>"`` for a permission or read-only error on ``path``, else ``""``.

    For a caller that does not know whether the path was being read or
    written: a readable path means writing (in its directory) was refused.
    ``kwargs`` (``setting``, ``fix``) go to :func:`explain_denied`.
    """
    target = path if path is not None else exc.filename
    if target is None or exc.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
        return ""
    target = os.fsdecode(target) if isinstance(target, bytes) else str(target)
    hint = explain_denied(target, write=False, **kwargs)
    if hint.startswith("the agent runs as"):
        where = target if os.path.isdir(target) else os.path.dirname(os.path.abspath(target))
        hint = explain_denied(where, write=True, **kwargs)
    return f": {hint}"


def _first_refusal(target: Path, *, write: bool) -> tuple[Path, str] | None:
    """The first component on the way to ``target`` that refuses the agent, and what it refuses."""
    for ancestor in reversed(target.parents):  # "/" first: each one's parent is searchable
        if not os.path.lexists(ancestor):
            return (ancestor.parent, "write in") if write else None
        if not _access(ancestor, os.X_OK):
            return ancestor, "enter (search)"
    if not write:
        if not os.path.lexists(target) or _access(target, os.R_OK):
            return None
        return target, "read"
    if not os.path.lexists(target):
        target = target.parent
    if not os.path.isdir(target):  # an existing file the agent opens for writing
        return None if _access(target, os.W_OK) else (target, "write")
    if _access(target, os.W_OK | os.X_OK) and not _read_only_fs(target):
        return None
    return target, "write in"


def _access(path: Path, mode: int) -> bool:
    return os.access(path, mode, effective_ids=os.access in os.supports_effective_ids)


def _read_only_fs(path: Path) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        return False
