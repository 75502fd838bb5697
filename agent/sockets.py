"""Binding the Unix socket safely: a verified private directory, no stale file, mode set at once."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import grp
import logging
import os
import socket
import stat
from pathlib import Path

from aiohttp import web

from agent import fsutil
from agent.errors import ConfigError
from agent.ratelog import RateLimitedLog

log = logging.getLogger(__name__)

_MAX_SUN_PATH = 107
_SOCKET_DIR_MODE = 0o711  # others may connect but not list or write
_DENIED = (errno.EACCES, errno.EPERM, errno.EROFS)
#: asyncio's message when ``accept()`` fails with EMFILE, ENFILE, ENOBUFS or ENOMEM.
_ACCEPT_EXHAUSTED = "socket.accept() out of system resource"


def quiet_accept_errors(loop: asyncio.AbstractEventLoop, *, interval: float = 10.0) -> None:
    """Log "accept out of resources" once per ``interval`` with a count, without a traceback.

    asyncio reports each failed ``accept()`` through the loop's exception
    handler with a full traceback and retries a second later, per listener:
    under a descriptor flood that was 40 MB of log in 25 s (issue 11). Other
    reports go to the handler that was installed before.
    """
    previous = loop.get_exception_handler()
    limited = RateLimitedLog(log, interval=interval)

    def handler(lp: asyncio.AbstractEventLoop, context: dict[str, object]) -> None:
        if context.get("message") == _ACCEPT_EXHAUSTED:
            exc = context.get("exception")
            reason = exc.strerror if isinstance(exc, OSError) else "unknown"
            limited.warning(
                "accept",
                "cannot accept connections: %s; new connections wait until descriptors free up",
                reason,
            )
            return
        if previous is not None:
            previous(lp, context)
        else:
            lp.default_exception_handler(context)

    loop.set_exception_handler(handler)


def prepare_socket_path(path: Path, *, shared_volume: bool = False) -> None:
    """Create and verify the socket's directory, and remove a stale socket left by a crash.

    The directory must be owned by the agent's uid or root and writable by no
    one else, and so must every directory above it (sticky ones excepted, such
    as /tmp): otherwise another local user could rename the socket and bind
    their own. A missing directory is created 0711. With ``shared_volume``
    its parent may be world-writable (a pod's emptyDir): the agent then
    creates the socket directory itself and verifies that it owns it.

    Raises:
        ConfigError: the path is too long, a directory fails the check (naming
            it, its owner and mode, and the fix), something other than a socket
            sits at the path, or another agent is listening on it.
    """
    if len(os.fsencode(path)) > _MAX_SUN_PATH:
        raise ConfigError(
            f"socket path is longer than {_MAX_SUN_PATH} bytes: {path}", path="listen.socket"
        )
    parent = path.parent
    try:
        if not parent.parent.exists():
            # e.g. ~/.cache on a fresh account; private, and verified below like the rest.
            fsutil.make_dirs(parent.parent, mode=0o700)
        fd = fsutil.open_checked_dir(
            parent,
            create_mode=_SOCKET_DIR_MODE,
            shared_parent_ok=shared_volume,
            what="socket directory",
        )
    except fsutil.UnsafeDirectory as exc:
        hint = ""
        if "writable by group or others" in exc.message and not shared_volume:
            hint = (
                " (for a volume shared within one pod, such as an emptyDir, put the socket in a "
                "subdirectory the agent creates, e.g. <volume>/secrets-agent/agent.sock, and set "
                "listen.shared_volume: true)"
            )
        elif "writable by group or others" in exc.message and exc.message.startswith("socket"):
            hint = (
                " (with listen.shared_volume the volume is the socket directory's parent: "
                f"use {parent / 'secrets-agent' / path.name})"
            )
        raise ConfigError(exc.message + hint, path="listen.socket") from None
    except OSError as exc:
        raise ConfigError(
            f"cannot create or open socket directory {parent}: {exc.strerror}"
            + _denied(exc, parent),
            path="listen.socket",
        ) from None
    try:
        _remove_stale(fd, path)
    finally:
        os.close(fd)


def _denied(exc: OSError, directory: Path) -> str:
    """The owner, mode and fix of a directory the agent may not write in (else "")."""
    if exc.errno not in _DENIED:
        return ""
    return ": " + fsutil.explain_denied(
        directory, write=True, setting="listen.socket (or $XDG_RUNTIME_DIR)"
    )


def _remove_stale(dir_fd: int, path: Path) -> None:
    try:
        st = os.stat(path.name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise ConfigError(f"{path} exists and is not a socket", path="listen.socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except OSError:
        os.unlink(path.name, dir_fd=dir_fd)  # stale: nobody listens
    else:
        raise ConfigError(f"another process is listening on {path}", path="listen.socket")
    finally:
        probe.close()


async def bind_unix_site(
    runner: web.AppRunner,
    path: Path,
    *,
    mode: int,
    group: str | int | None,
    shared_volume: bool = False,
) -> None:
    """Listen on ``path`` with ``mode`` (and ``group``), never wider in between."""
    prepare_socket_path(path, shared_volume=shared_volume)
    gid = -1
    if group is not None:
        try:
            gid = group if isinstance(group, int) else grp.getgrnam(group).gr_gid
        except KeyError:
            raise ConfigError(f"unknown group {group!r}", path="listen.socket_group") from None
    old = os.umask(0o177)  # the socket is created 0600, then opened up to ``mode``
    try:
        await web.UnixSite(runner, str(path)).start()
    except OSError as exc:
        # e.g. a root-owned --tmpfs mount: the directory passes the ownership
        # check (root may own it) but the agent's uid cannot create the socket.
        if exc.errno not in _DENIED:
            raise
        raise ConfigError(
            f"cannot create the socket {path}: {exc.strerror}" + _denied(exc, path.parent),
            path="listen.socket",
        ) from None
    finally:
        os.umask(old)
    with contextlib.suppress(PermissionError):
        if gid != -1:
            os.chown(path, -1, gid)
    os.chmod(path, mode)
