"""The optional loopback TCP listener (``listen.tcp``): the AWS-style port.

Off by default. It serves the same routes as the Unix socket, but a TCP peer
has no kernel-attested identity, so every request except ``/healthz`` and
``/ping`` must carry a configured token, and token callers are matched by
``access`` rules naming that token. Requests relayed by a proxy
(``X-Forwarded-For``/``Forwarded``) are refused: a token-holding process
could otherwise be tricked into fetching for a remote party (SSRF). The
listening socket is bound to loopback only (checked at config load and again
at bind) and sends with IP TTL / hop limit 1, so answers cannot leave the host.
"""

from __future__ import annotations

import ipaddress
import socket
from pathlib import Path

from aiohttp import web

from agent.config import TcpListenConfig, split_host_port
from agent.errors import ConfigError
from agent.server.app import build_app, metrics
from agent.server.checks import TokenAuth, only_get, refuse_forwarded
from agent.server.connections import ConnectionLimits, GuardedRunner
from agent.server.state import STATE, ServerState

_BACKLOG = 128


def build_tcp_app(
    state: ServerState, tcp: TcpListenConfig, *, base_dir: Path | None
) -> web.Application:
    """The TCP listener's application: token identity, no forwarding, GET only.

    Raises:
        ConfigError: a token reference cannot be read, or two tokens are equal.
    """
    return build_app(
        state,
        listener="tcp",
        checks=[refuse_forwarded, TokenAuth.from_config(tcp, base_dir=base_dir), only_get],
        max_connections=tcp.max_connections,
        aws_path_prefix=tcp.aws_path_prefix,
    )


def loopback_socket(address: str) -> socket.socket:
    """A listening TCP socket on a loopback ``address`` (port 0: any free port).

    Raises:
        ConfigError: the address is not loopback, or cannot be bound.
    """
    host, port = split_host_port(address)
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except OSError as exc:
        raise ConfigError(f"cannot resolve {address!r}: {exc}", path="listen.tcp.address") from None
    family, _, _, _, sockaddr = infos[0]
    if not ipaddress.ip_address(sockaddr[0]).is_loopback:
        raise ConfigError(f"{address!r} is not a loopback address", path="listen.tcp.address")
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_UNICAST_HOPS, 1)
        else:
            sock.setsockopt(socket.IPPROTO_IP, socket.IP_TTL, 1)
        sock.bind(sockaddr)
        sock.listen(_BACKLOG)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        raise ConfigError(
            f"cannot listen on {address!r}: {exc.strerror}", path="listen.tcp.address"
        ) from None
    return sock


async def start_tcp_site(runner: web.AppRunner, tcp: TcpListenConfig) -> tuple[web.SockSite, int]:
    """Start ``runner`` on the loopback address of ``tcp``; return the site and its port."""
    sock = loopback_socket(tcp.address)
    port = int(sock.getsockname()[1])
    site = web.SockSite(runner, sock)
    await site.start()
    return site, port


async def start_tcp_listener(
    state: ServerState,
    tcp: TcpListenConfig,
    *,
    base_dir: Path | None,
    limits: ConnectionLimits | None = None,
) -> tuple[GuardedRunner, int]:
    """Build, set up and start the TCP listener; the caller owns (and cleans up) the runner."""
    runner = GuardedRunner(
        build_tcp_app(state, tcp, base_dir=base_dir),
        listener="tcp",
        limits=limits or ConnectionLimits(),
    )
    await runner.setup()
    try:
        _, port = await start_tcp_site(runner, tcp)
    except BaseException:
        await runner.cleanup()
        raise
    return runner, port


async def start_metrics_listener(
    state: ServerState, address: str, *, limits: ConnectionLimits | None = None
) -> GuardedRunner:
    """Serve ``/metrics`` alone on ``address`` (``metrics.listen``), connection-guarded.

    Only ``GET /metrics`` is routed; it needs no token (Prometheus scrapes it)
    and tells no secret. The caller owns (and cleans up) the runner.
    """
    host, port = split_host_port(address)
    app = web.Application(client_max_size=4096)
    app[STATE] = state
    app.router.add_get("/metrics", metrics)
    runner = GuardedRunner(app, listener="metrics", limits=limits or ConnectionLimits())
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port, backlog=_BACKLOG).start()
    except BaseException:
        await runner.cleanup()
        raise
    return runner
