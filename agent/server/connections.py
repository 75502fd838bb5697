"""Connection limits per listener: a total cap counting idle connections, and timeouts.

aiohttp counts nothing but requests in flight, so a peer that opens
connections and sends nothing (or half a request, slowly) holds a file
descriptor each for as long as it likes; enough of them starve every
listener of the process, the Unix socket included (issue 11). Here each
listener gets:

* a cap on open connections, idle ones included. When a new connection
  arrives at the cap, the oldest connection with no request in progress is
  closed to make room; if every one is busy, the new one is answered ``503``
  and closed. So a flood of idle connections cannot lock callers out: it
  only displaces itself.
* a header timeout: a new connection must deliver a whole request head within
  it, or it is closed (slowloris);
* a keep-alive timeout: a connection idle between requests is closed after it
  (aiohttp's own timer, shortened from its 75 s default).

The caps are also fitted under ``RLIMIT_NOFILE`` (:func:`fit_caps`), leaving
``reserved_fds`` descriptors for the store, the audit log, watches and
rendering, so clients can never take the last descriptor.

:class:`GuardedRunner` is an :class:`aiohttp.web.AppRunner` whose connections
are made by :class:`ConnectionGuard`; any site (Unix, socket, TCP) started on
it is guarded. Malformed requests that aiohttp's parser refuses before any
middleware runs are answered by :class:`SafeRequestHandler` with a JSON 400
that never echoes the request, and logged without it (a header may carry a
token), at most once per interval.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import resource
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, cast

from aiohttp import web
from aiohttp.http import HttpVersion10
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest

from agent.config import ConnectionsConfig
from agent.ratelog import RateLimitedLog

log = logging.getLogger(__name__)

#: Descriptors a listener may hold transiently beyond its cap: accepted by the
#: event loop (up to the listen backlog per wake-up) before the guard closes them.
LISTEN_BACKLOG = 128
#: The smallest cap :func:`fit_caps` hands out, however tight the limit.
MIN_CAP = 16

_REFUSED_BODY = b'{"error": {"code": "too_many_connections", "message": "too many connections"}}'
_REFUSED = (
    b"HTTP/1.1 503 Service Unavailable\r\n"
    b"Content-Type: application/json\r\n"
    b"Cache-Control: no-store\r\n"
    b"Retry-After: 1\r\n"
    b"Connection: close\r\n"
    b"Content-Length: %d\r\n\r\n%s" % (len(_REFUSED_BODY), _REFUSED_BODY)
)


@dataclass(frozen=True, slots=True)
class ConnectionLimits:
    """The limits of one listener (``listen.connections`` in the config)."""

    max_open: int = 512
    header_timeout: float = 10.0
    keepalive_timeout: float = 15.0


def raise_nofile_limit() -> tuple[int, int]:
    """Raise the soft ``RLIMIT_NOFILE`` to the hard one (as Go's runtime does); return both."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    return soft, hard


def open_fd_count() -> int:
    """Descriptors this process has open now (0 where ``/proc`` is not mounted)."""
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:
        return 0


def fit_caps(
    wanted: dict[str, int], *, reserved: int, soft_limit: int | None = None
) -> dict[str, int]:
    """Per-listener caps that fit under the open-file limit with ``reserved`` to spare.

    Each listener may hold its cap plus one listen backlog of descriptors; the
    descriptors open now and ``reserved`` more stay out of the budget. When
    the wanted caps do not fit, they are scaled down proportionally (never
    below :data:`MIN_CAP`) and a warning says so.
    """
    if soft_limit is None:
        soft_limit, _ = raise_nofile_limit()
    if soft_limit == resource.RLIM_INFINITY or not wanted:
        return dict(wanted)
    budget = soft_limit - open_fd_count() - reserved - LISTEN_BACKLOG * len(wanted)
    total = sum(wanted.values())
    if total <= budget:
        return dict(wanted)
    caps = {name: max(MIN_CAP, budget * cap // total) for name, cap in wanted.items()}
    log.warning(
        "open connections capped at %s to fit RLIMIT_NOFILE %d with %d descriptors reserved",
        ", ".join(f"{cap} ({name})" for name, cap in caps.items()),
        soft_limit,
        reserved,
    )
    return caps


def listener_limits(
    cfg: ConnectionsConfig, listeners: Sequence[str], *, soft_limit: int | None = None
) -> dict[str, ConnectionLimits]:
    """The limits of each named listener, their caps fitted under ``RLIMIT_NOFILE``."""
    caps = fit_caps(
        dict.fromkeys(listeners, cfg.max_open),
        reserved=cfg.reserved_fds,
        soft_limit=soft_limit,
    )
    return {
        name: ConnectionLimits(
            max_open=caps[name],
            header_timeout=cfg.header_timeout,
            keepalive_timeout=cfg.keepalive_timeout,
        )
        for name in listeners
    }


class SafeRequestHandler(RequestHandler):
    """aiohttp's connection protocol, tracked by a guard and quiet about malformed requests."""

    def __init__(self, manager: web.Server, *, guard: ConnectionGuard, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self.guard = guard
        self.opened = 0.0
        self._header_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.opened = time.monotonic()
        if self.guard.limits.header_timeout > 0:
            self._header_timer = self._loop.call_later(
                self.guard.limits.header_timeout, self._header_deadline
            )
        self.guard.opened(self)

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None
        self.guard.closed(self)
        super().connection_lost(exc)

    @property
    def busy(self) -> bool:
        """A request is being handled on this connection (it is not idle)."""
        return bool(self._request_in_progress)

    def _header_deadline(self) -> None:
        self._header_timer = None
        if self._request_count == 0 and not self._request_in_progress:
            self.guard.timed_out += 1
            self.force_close()

    def handle_error(
        self,
        request: BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        """A JSON error that echoes nothing of the request; logged by class name only.

        aiohttp's own answer is a text body quoting the offending line, and
        its log entry a traceback quoting it again: a token header with one
        bad byte ends up in both.
        """
        if request.writer.output_size > 0:
            raise ConnectionError("response already started; closing the connection")
        if 400 <= status < 500:
            code, text = "bad_request", "malformed HTTP request"
            self.guard.malformed += 1
            self.guard.log.log(
                logging.INFO,
                "malformed",
                "refused a malformed HTTP request on %s (%s)",
                self.guard.listener,
                type(exc).__name__ if exc is not None else status,
            )
        else:
            code, text = "internal", "internal error"
            self.guard.log.error(
                "internal",
                "internal error on %s (%s)",
                self.guard.listener,
                type(exc).__name__ if exc is not None else status,
            )
        body = json.dumps({"error": {"code": code, "message": text}})
        resp = web.Response(
            status=status,
            text=body,
            content_type="application/json",
            headers={"Cache-Control": "no-store"},
        )
        resp.force_close()
        return resp


class _Refused:
    """The protocol of a connection over the cap with every other one busy: 503, close."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        tr = cast(asyncio.Transport, transport)
        tr.write(_REFUSED)
        tr.close()

    def data_received(self, data: bytes) -> None:
        return None

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: BaseException | None) -> None:
        return None

    def pause_writing(self) -> None:
        return None

    def resume_writing(self) -> None:
        return None


class ConnectionGuard:
    """The protocol factory of one listener: enforces its cap and counts what it did."""

    def __init__(
        self,
        server: web.Server,
        *,
        listener: str,
        limits: ConnectionLimits,
        handler_kwargs: dict[str, Any],
    ) -> None:
        self.server = server
        self.listener = listener
        self.limits = limits
        self._handler_kwargs = handler_kwargs
        #: Open connections, oldest first (dicts keep insertion order).
        self._open: dict[SafeRequestHandler, None] = {}
        self.evicted = 0
        self.refused = 0
        self.timed_out = 0
        self.malformed = 0
        #: Says a repeated thing (malformed requests) once per interval, with a count.
        self.log = RateLimitedLog(log, interval=10.0)

    @property
    def open_count(self) -> int:
        """Connections open on this listener now."""
        return len(self._open)

    def __call__(self) -> asyncio.BaseProtocol:
        if len(self._open) >= self.limits.max_open and not self._evict_one():
            self.refused += 1
            return cast(asyncio.BaseProtocol, _Refused())
        return SafeRequestHandler(
            self.server,
            guard=self,
            loop=asyncio.get_running_loop(),
            **self._handler_kwargs,
        )

    def _evict_one(self) -> bool:
        for handler in self._open:
            if not handler.busy:
                self.evicted += 1
                self._open.pop(handler, None)
                handler.force_close()
                return True
        return False

    def opened(self, handler: SafeRequestHandler) -> None:
        self._open[handler] = None

    def closed(self, handler: SafeRequestHandler) -> None:
        self._open.pop(handler, None)

    def status(self) -> dict[str, int]:
        """Counters for ``/v1/status`` and the tests."""
        return {
            "open": len(self._open),
            "max_open": self.limits.max_open,
            "evicted": self.evicted,
            "refused": self.refused,
            "timed_out": self.timed_out,
            "malformed": self.malformed,
        }


def _refuse_http09(
    handler: Callable[[BaseRequest], Awaitable[web.StreamResponse]], guard: ConnectionGuard
) -> Any:
    """Wrap the app's request handler: a request line without an HTTP version is refused."""

    async def handle(request: BaseRequest) -> web.StreamResponse:
        if request.version < HttpVersion10:
            guard.malformed += 1
            guard.log.log(
                logging.INFO,
                "http09",
                "refused a request line without an HTTP version on %s",
                guard.listener,
            )
            resp = web.Response(
                status=400,
                text=json.dumps(
                    {"error": {"code": "bad_request", "message": "an HTTP version is required"}}
                ),
                content_type="application/json",
            )
            resp.force_close()
            return resp
        expect = request.headers.get("Expect")
        if expect is not None and expect.strip().lower() != "100-continue":
            # aiohttp answers an unknown expectation before any middleware, with
            # the header quoted in its body: a non-ASCII byte there made it a 500
            # (found by the full HTTP fuzz run). Refused here, quoting nothing.
            guard.malformed += 1
            guard.log.log(
                logging.INFO, "expect", "refused an unknown Expect header on %s", guard.listener
            )
            resp = web.Response(
                status=417,
                text=json.dumps(
                    {
                        "error": {
                            "code": "expectation_failed",
                            "message": "only 'Expect: 100-continue' is supported",
                        }
                    }
                ),
                content_type="application/json",
            )
            resp.force_close()
            return resp
        return await handler(request)

    return handle


class GuardedRunner(web.AppRunner):
    """An AppRunner whose sites (Unix, socket, TCP) are guarded by a :class:`ConnectionGuard`."""

    def __init__(self, app: web.Application, *, listener: str, limits: ConnectionLimits) -> None:
        super().__init__(
            app, handle_signals=False, access_log=None, keepalive_timeout=limits.keepalive_timeout
        )
        self.listener = listener
        self.limits = limits
        self.guard: ConnectionGuard | None = None

    async def _make_server(self) -> web.Server:
        # aiohttp's sites call ``runner.server()`` for each connection; the
        # guard stands in for the server there and delegates the rest to it.
        server = await super()._make_server()
        self.guard = ConnectionGuard(
            server,
            listener=self.listener,
            limits=self.limits,
            handler_kwargs={"access_log": None, "keepalive_timeout": self.limits.keepalive_timeout},
        )
        server.request_handler = _refuse_http09(server.request_handler, self.guard)
        return cast(web.Server, _ServerFacade(server, self.guard))


class _ServerFacade:
    """The runner's server as sites see it: connections come from the guard."""

    def __init__(self, server: web.Server, guard: ConnectionGuard) -> None:
        self._server = server
        self._guard = guard

    def __call__(self) -> asyncio.BaseProtocol:
        return self._guard()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._server, name)
