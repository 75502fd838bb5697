"""Request checks that run before any handler: a chain of small validators.

Each check looks at one thing and either passes or raises an
:class:`~agent.server.errors.ApiError`; the identity checks also attach the
:class:`~agent.server.peer.Caller`. The order follows the AWS agent's: the
connection limit, then forwarding, then identity (token), then the method.
``/healthz`` and ``/ping`` need no token, so load balancers and the AWS-style
health check work unauthenticated; they answer nothing secret.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

from aiohttp import web
from aiohttp.typedefs import Middleware

from agent.config import TcpListenConfig, read_secret_ref
from agent.errors import ConfigError
from agent.server.errors import ApiError, Handler
from agent.server.peer import Caller
from agent.server.state import CALLER, LISTENER, STATE

log = logging.getLogger(__name__)

#: A request check: raises ApiError to refuse the request.
Check = Callable[[web.Request], None]

#: Paths answered without a token (and without the forwarding check), as the AWS agent does.
OPEN_PATHS = frozenset({"/healthz", "/ping"})
#: The headers that carry a token by default (``listen.tcp.token_headers``): ours, then
#: the two the AWS agent checks by default (its ``ssrf_headers``).
TOKEN_HEADERS = ("X-Secrets-Agent-Token", "X-Aws-Parameters-Secrets-Token", "X-Vault-Token")
FORWARDING_HEADERS = ("X-Forwarded-For", "Forwarded")
#: Health checks may exceed the limit by this much, so probes still answer under load.
HEALTH_HEADROOM = 2
_ALLOWED_METHODS = frozenset({"GET", "HEAD"})


class Limiter:
    """Requests in flight on one listener; beyond ``limit`` the answer is 429."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.inflight = 0

    @contextlib.contextmanager
    def slot(self, path: str) -> Iterator[None]:
        """Hold one slot for the duration of a request.

        Raises:
            ApiError: 429, the listener is at its limit.
        """
        limit = self.limit + (HEALTH_HEADROOM if path in OPEN_PATHS else 0)
        if self.inflight >= limit:
            raise ApiError(
                "Connection limit exceeded",
                status=429,
                code="too_many_requests",
                aws_type="ThrottlingException",
                headers={"Retry-After": "1"},
            )
        self.inflight += 1
        try:
            yield
        finally:
            self.inflight -= 1


def _refuse(request: web.Request, reason: str) -> None:
    """Count and audit a request refused before it reached a route."""
    state = request.app[STATE]
    listener = request.app[LISTENER]
    known = request.get(CALLER)
    caller = known if isinstance(known, Caller) else Caller(listener)
    state.metrics.access_decisions.labels(listener, "deny").inc()
    state.audit.record("denied", caller=caller, outcome="refused", reason=reason)
    log.info("refused %s %s on %s: %s", request.method, request.path, listener, reason)


def refuse_forwarded(request: web.Request) -> None:
    """Refuse requests relayed by a proxy: the caller's identity would be the proxy's."""
    if request.path in OPEN_PATHS:
        return
    for header in FORWARDING_HEADERS:
        if header in request.headers:
            _refuse(request, f"{header} header present")
            raise ApiError(
                f"Forwarded: requests carrying {header} are refused",
                status=400,
                code="forwarded",
                aws_type="InvalidRequestException",
            )


def only_get(request: web.Request) -> None:
    """Every route is read-only: anything but GET and HEAD is 405."""
    if request.method not in _ALLOWED_METHODS:
        raise ApiError(
            f"method {request.method} is not allowed; use GET",
            status=405,
            code="method_not_allowed",
            aws_type="MethodNotAllowedException",
            headers={"Allow": "GET, HEAD"},
        )


def unix_identity(request: web.Request) -> None:
    """Attach the Unix-socket caller from ``SO_PEERCRED`` (read once per connection)."""
    state = request.app[STATE]
    policy = state.policy
    request[CALLER] = state.peers.caller(request, groups=policy.needs_groups, exe=policy.needs_exe)


class TokenAuth:
    """The TCP listener's identity check: a known token, compared in constant time.

    Only SHA-256 digests of the tokens are kept. Each presented value is
    compared with every configured digest with :func:`hmac.compare_digest`,
    without stopping at a match, so timing tells neither the token nor which
    one matched.
    """

    def __init__(
        self, tokens: Mapping[str, bytes], *, headers: Sequence[str] = TOKEN_HEADERS
    ) -> None:
        self.headers = tuple(headers)
        digests: list[tuple[str, bytes]] = []
        seen: dict[bytes, str] = {}
        for name, value in tokens.items():
            if not value:
                raise ConfigError("the token is empty", path=f"listen.tcp.tokens.{name}")
            digest = hashlib.sha256(value).digest()
            if digest in seen:
                raise ConfigError(
                    f"tokens {seen[digest]!r} and {name!r} have the same value",
                    path="listen.tcp.tokens",
                )
            seen[digest] = name
            digests.append((name, digest))
        self._digests = tuple(digests)

    @classmethod
    def from_config(cls, tcp: TcpListenConfig, *, base_dir: Path | None) -> TokenAuth:
        """Read every token reference (``file://`` or ``env:``) once, at start.

        Raises:
            ConfigError: a reference cannot be read or is empty (the message
                names the reference, never the token).
        """
        return cls(
            {name: read_secret_ref(ref, base_dir=base_dir) for name, ref in tcp.tokens.items()},
            headers=tcp.token_headers,
        )

    def identify(self, presented: bytes) -> str | None:
        """The name of the token ``presented`` equals, or None."""
        digest = hashlib.sha256(presented).digest()
        found = None
        for name, expected in self._digests:
            match = hmac.compare_digest(digest, expected)
            found = name if match else found
        return found

    def __call__(self, request: web.Request) -> None:
        if request.path in OPEN_PATHS:
            request[CALLER] = Caller("tcp")
            return
        names = {
            self.identify(value.encode("utf-8", "surrogateescape"))
            for header in self.headers
            for value in request.headers.getall(header, [])
        }
        if len(names) != 1 or None in names:
            _refuse(request, "missing, unknown or conflicting token")
            raise ApiError(
                f"Bad Token: send a valid token in one of {', '.join(self.headers)}",
                status=403,
                code="bad_token",
                aws_type="AccessDeniedException",
            )
        request[CALLER] = Caller("tcp", token=names.pop())


def guard(limiter: Limiter, checks: Sequence[Check]) -> Middleware:
    """A middleware that holds a limiter slot and runs ``checks`` in order."""

    @web.middleware
    async def guard_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        with limiter.slot(request.path):
            for check in checks:
                check(request)
            return await handler(request)

    return guard_middleware
