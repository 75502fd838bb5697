"""Who is calling: peer credentials on the Unix socket, a token name on TCP.

On the Unix socket the kernel tells us the peer's uid, gid and pid at connect
time (``SO_PEERCRED``); nothing the client sends can change them. The pid is
also used to read the executable (``/proc/<pid>/exe``) and the supplementary
groups (``/proc/<pid>/status``). Those two are best effort: a pid outside our
pid namespace reads as 0, an agent not running as root (or as the caller's
uid) may not read another user's ``/proc/<pid>/exe``, and a process can exec
another binary after connecting. A rule naming ``exe`` therefore fails closed
when the executable is unknown.
"""

from __future__ import annotations

import os
import socket
import struct
from dataclasses import dataclass, field

from aiohttp import web

_UCRED = struct.Struct("3i")


@dataclass(frozen=True, slots=True)
class Caller:
    """The identity a request is checked against.

    ``listener`` is ``"unix"`` or ``"tcp"``. On the Unix socket ``uid``,
    ``gid``, ``pid``, ``groups`` (primary and supplementary) and ``exe`` come
    from the kernel; on TCP ``token`` is the *name* of the token the request
    presented (never its value) and the rest is unknown.
    """

    listener: str
    uid: int | None = None
    gid: int | None = None
    pid: int | None = None
    groups: frozenset[int] = field(default_factory=frozenset)
    exe: str | None = None
    token: str | None = None

    def describe(self) -> dict[str, object]:
        """Fields for audit records and logs (no secrets, no token values)."""
        out: dict[str, object] = {"listener": self.listener}
        if self.listener == "unix":
            out.update(uid=self.uid, gid=self.gid, pid=self.pid, exe=self.exe)
        else:
            out["token"] = self.token
        return out


def supplementary_groups(pid: int) -> frozenset[int]:
    """The caller's supplementary groups, from ``/proc/<pid>/status`` (best effort)."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as fh:
            for line in fh:
                if line.startswith("Groups:"):
                    return frozenset(int(g) for g in line.split()[1:])
    except (OSError, ValueError):
        pass
    return frozenset()


def executable(pid: int) -> str | None:
    """The caller's executable, from ``/proc/<pid>/exe`` (None if it cannot be read)."""
    if pid <= 0:
        return None
    try:
        return os.readlink(f"/proc/{pid}/exe")
    except OSError:
        return None


def unix_peer(request: web.Request) -> Caller:
    """The caller on a Unix-socket request, from ``SO_PEERCRED``.

    Returns a caller with no uid if the kernel does not say; such a caller
    matches no rule.
    """
    transport = request.transport
    sock = transport.get_extra_info("socket") if transport is not None else None
    if sock is None or sock.family != socket.AF_UNIX:
        return Caller("unix")
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    except OSError:
        return Caller("unix")
    pid, uid, gid = _UCRED.unpack(raw)
    return Caller(
        "unix",
        uid=uid,
        gid=gid,
        pid=pid,
        groups=supplementary_groups(pid) | {gid},
        exe=executable(pid),
    )
