"""Binding the Unix socket safely: private directory, no stale files, mode set at once."""

from __future__ import annotations

import asyncio
import contextlib
import grp
import logging
import os
import socket
import stat
from pathlib import Path

from aiohttp import web

from agent.errors import ConfigError
from agent.ratelog import RateLimitedLog

log = logging.getLogger(__name__)

_MAX_SUN_PATH = 107
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


def prepare_socket_path(path: Path) -> None:
    """Create the socket's directory (0711: others may connect but not list or
    write) and remove a stale socket left by a crashed agent.

    Raises:
        ConfigError: the path is too long, the directory is writable by others,
            something other than a socket sits at the path, or another agent
            is listening on it.
    """
    if len(os.fsencode(path)) > _MAX_SUN_PATH:
        raise ConfigError(
            f"socket path is longer than {_MAX_SUN_PATH} bytes: {path}", path="listen.socket"
        )
    parent = path.parent
    if not parent.exists():
        parent.mkdir(mode=0o711, parents=True)
        os.chmod(parent, 0o711)  # noqa: S103 - traversable, not listable; umask filters mkdir
    st = parent.stat()
    if st.st_mode & stat.S_IWOTH and not st.st_mode & stat.S_ISVTX:
        raise ConfigError(
            f"socket directory {parent} is writable by everyone; "
            "another user could replace the socket",
            path="listen.socket",
        )
    try:
        st = path.lstat()
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise ConfigError(f"{path} exists and is not a socket", path="listen.socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except OSError:
        path.unlink()  # stale: nobody listens
    else:
        raise ConfigError(f"another process is listening on {path}", path="listen.socket")
    finally:
        probe.close()


async def bind_unix_site(
    runner: web.AppRunner, path: Path, *, mode: int, group: str | int | None
) -> None:
    """Listen on ``path`` with ``mode`` (and ``group``), never wider in between."""
    prepare_socket_path(path)
    gid = -1
    if group is not None:
        try:
            gid = group if isinstance(group, int) else grp.getgrnam(group).gr_gid
        except KeyError:
            raise ConfigError(f"unknown group {group!r}", path="listen.socket_group") from None
    old = os.umask(0o177)  # the socket is created 0600, then opened up to ``mode``
    try:
        await web.UnixSite(runner, str(path)).start()
    finally:
        os.umask(old)
    with contextlib.suppress(PermissionError):
        if gid != -1:
            os.chown(path, -1, gid)
    os.chmod(path, mode)
