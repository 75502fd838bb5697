"""Who is calling: peer credentials on the Unix socket, a token name on TCP.

On the Unix socket the kernel tells us the peer's uid, gid and pid at connect
time (``SO_PEERCRED``); nothing the client sends can change them. The pid is
also used to read the executable (``/proc/<pid>/exe``) and the supplementary
groups (``/proc/<pid>/status``). Those two are best effort: a pid outside our
pid namespace reads as 0, an agent not running as root (or as the caller's
uid) may not read another user's ``/proc/<pid>/exe``, and a process can exec
another binary after connecting. A rule naming ``exe`` therefore fails closed
when the executable is unknown.

``SO_PEERCRED`` belongs to the connection, so the identity is read once per
connection (:class:`PeerIdentities`), not once per request: the executable
once (it names the caller in audit records), the supplementary groups only
while some rule names ``gids``. While some rule names ``exe``, the executable
is read again on every request, so a process that execs another binary and
keeps its connection open is checked as that binary (a new connection from
the same pid reads everything afresh anyway).
"""

from __future__ import annotations

import os
import socket
import struct
import weakref
from dataclasses import dataclass, field, replace

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
    #: What access decisions depend on (not the pid), for the decision cache.
    key: tuple[object, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        ident = self.token if self.listener == "tcp" else self.uid
        object.__setattr__(self, "key", (self.listener, ident, self.groups, self.exe))

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


def _peercred(request: web.Request) -> tuple[int, int, int] | None:
    transport = request.transport
    sock = transport.get_extra_info("socket") if transport is not None else None
    if sock is None or sock.family != socket.AF_UNIX:
        return None
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    except OSError:
        return None
    pid, uid, gid = _UCRED.unpack(raw)
    return pid, uid, gid


def unix_peer(request: web.Request, *, groups: bool = True) -> Caller:
    """The caller on a Unix-socket request, from ``SO_PEERCRED`` (read now, not cached).

    Returns a caller with no uid if the kernel does not say; such a caller
    matches no rule. ``groups=False`` skips reading the supplementary groups
    (the caller's groups are then only its primary gid).
    """
    cred = _peercred(request)
    if cred is None:
        return Caller("unix")
    pid, uid, gid = cred
    return Caller(
        "unix",
        uid=uid,
        gid=gid,
        pid=pid,
        groups=(supplementary_groups(pid) if groups else frozenset()) | {gid},
        exe=executable(pid),
    )


@dataclass(slots=True)
class _Known:
    caller: Caller
    with_groups: bool


class PeerIdentities:
    """The caller of each open Unix-socket connection, read once per connection.

    Entries are keyed weakly by the connection's transport, so a closed
    connection's identity goes with it.
    """

    def __init__(self) -> None:
        self._known: weakref.WeakKeyDictionary[object, _Known] = weakref.WeakKeyDictionary()

    def caller(self, request: web.Request, *, groups: bool, exe: bool) -> Caller:
        """The caller on ``request``'s connection.

        Args:
            groups: some rule names ``gids``: the supplementary groups are needed.
            exe: some rule names ``exe``: read the executable again now.
        """
        transport = request.transport
        if transport is None:
            return unix_peer(request, groups=groups)
        known = self._known.get(transport)
        if known is None or (groups and not known.with_groups):
            known = _Known(unix_peer(request, groups=groups), groups)
            self._known[transport] = known
        elif exe and known.caller.pid is not None:
            now = executable(known.caller.pid)
            if now != known.caller.exe:
                known.caller = replace(known.caller, exe=now)
        return known.caller
