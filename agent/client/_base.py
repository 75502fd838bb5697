"""What both clients share: errors, where the agent is, and what each read asks for.

Standard library only (see :mod:`agent.client`).
"""

from __future__ import annotations

import ipaddress
import json
import os
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

T = TypeVar("T")
TOKEN_HEADER = "X-Secrets-Agent-Token"  # noqa: S105 - a header name


class ClientError(Exception):
    """The agent answered with an error (``status``, ``code``) or could not be reached.

    ``retry_after`` is the agent's ``Retry-After`` hint in seconds, if any.
    """

    def __init__(
        self,
        message: str,
        *,
        status: int = 0,
        code: str = "unreachable",
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.retry_after = retry_after

    @property
    def retryable(self) -> bool:
        """Whether trying again later may succeed (unreachable, 429, 503)."""
        return self.status in (0, 429, 503)


class BadRequestError(ClientError):
    """400: a malformed name, stage, version or query."""


class AccessDeniedError(ClientError):
    """403: this process may not read the secret (or it does not exist), or a bad token."""


class NotFoundError(ClientError):
    """404: no such secret, version, stage or key."""


class UnavailableError(ClientError):
    """503 (or unreachable): the agent cannot serve the value now; retry later."""


class TooManyRequestsError(UnavailableError):
    """429: the agent's connection limit was hit; retry shortly."""


_BY_STATUS: dict[int, type[ClientError]] = {
    400: BadRequestError,
    403: AccessDeniedError,
    404: NotFoundError,
    429: TooManyRequestsError,
    503: UnavailableError,
}


def default_socket_path() -> Path:
    """The agent's default socket (the same rule as ``agent.config``)."""
    if os.geteuid() == 0:
        return Path("/run/secrets-agent/agent.sock")
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg:
        return Path(xdg) / "secrets-agent" / "agent.sock"
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "secrets-agent" / "agent.sock"


def resolve_socket(path: str | os.PathLike[str] | None = None) -> Path:
    """The argument, else ``$SECRETS_AGENT_SOCKET``, else the default socket path."""
    if path is not None:
        return Path(path)
    env = os.environ.get("SECRETS_AGENT_SOCKET")
    return Path(env) if env else default_socket_path()


def _loopback_url(base_url: str) -> tuple[str, int]:
    """Host and port of an ``http://`` loopback URL (ValueError otherwise)."""
    parts = urllib.parse.urlsplit(base_url)
    host = parts.hostname or ""
    if parts.scheme != "http" or not host:
        raise ValueError(f"expected a URL like http://127.0.0.1:2773, got {base_url!r}")
    if host != "localhost":
        try:
            loopback = ipaddress.ip_address(host).is_loopback
        except ValueError:
            loopback = False
        if not loopback:
            raise ValueError(f"the agent listens on loopback only; refusing {host!r}")
    return host, parts.port or 80


def secret_path(
    name: str,
    *,
    key: str | None = None,
    stage: str | None = None,
    version: str | None = None,
    raw: bool = False,
) -> str:
    """The native API path (with query) that reads ``name``."""
    query = {k: v for k, v in (("key", key), ("stage", stage), ("version", version)) if v}
    if raw:
        query["format"] = "raw"
    qs = f"?{urllib.parse.urlencode(query)}" if query else ""
    return f"/v1/secrets/{urllib.parse.quote(name, safe='/')}{qs}"


def raise_for(status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
    """Raise the typed error for an error answer (either error shape)."""
    if status < 400:
        return
    code, message = "http_error", f"HTTP {status}"
    try:
        doc = json.loads(body)
        if "error" in doc:
            code, message = doc["error"]["code"], doc["error"]["message"]
        elif "__type" in doc:
            code, message = doc["__type"], doc.get("message", "")
    except (ValueError, KeyError, TypeError):
        pass
    retry_after = None
    raw_retry = {k.lower(): v for k, v in (headers or {}).items()}.get("retry-after")
    if raw_retry is not None and raw_retry.isdigit():
        retry_after = float(raw_retry)
    cls = _BY_STATUS.get(status, ClientError)
    raise cls(message, status=status, code=code, retry_after=retry_after)


@dataclass(frozen=True, slots=True)
class Endpoint:
    """Where the agent is: a Unix socket, or a loopback TCP listener with a token."""

    socket_path: Path | None
    base_url: str | None
    tcp: tuple[str, int] | None
    token: str | None

    @classmethod
    def of(
        cls,
        socket_path: str | os.PathLike[str] | None,
        *,
        base_url: str | None,
        token: str | None,
    ) -> Endpoint:
        """The socket (argument, env, default) or the loopback URL, with its token from env."""
        if base_url is None:
            return cls(resolve_socket(socket_path), None, None, None)
        token = token if token is not None else os.environ.get("SECRETS_AGENT_TOKEN")
        return cls(None, base_url, _loopback_url(base_url), token)

    @property
    def where(self) -> str:
        """The socket path or base URL, for messages."""
        return self.base_url if self.base_url is not None else str(self.socket_path)

    @property
    def headers(self) -> dict[str, str]:
        """The token header, on TCP only: the socket identifies callers by the kernel."""
        return {TOKEN_HEADER: self.token} if self.tcp is not None and self.token else {}

    def unreachable(self, exc: BaseException) -> UnavailableError:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
        return UnavailableError(f"cannot reach the agent at {self.where}: {reason}")


class ClientBase:
    """What both clients hold: where the agent is (see :meth:`Endpoint.of`)."""

    def __init__(
        self,
        socket_path: str | os.PathLike[str] | None,
        *,
        base_url: str | None,
        token: str | None,
    ) -> None:
        self._endpoint = Endpoint.of(socket_path, base_url=base_url, token=token)
        self.base_url = self._endpoint.base_url
        self.socket_path = self._endpoint.socket_path

    @property
    def where(self) -> str:
        """The socket path or base URL, for messages."""
        return self._endpoint.where


@dataclass(frozen=True, slots=True)
class Call(Generic[T]):
    """One read: the path to GET and how the (successful) body becomes the result."""

    path: str
    parse: Callable[[bytes], T]


def _text(body: bytes) -> str:
    return body.decode("utf-8")


def _same(body: bytes) -> bytes:
    return body


def _json(body: bytes) -> Any:
    return json.loads(body)


def _json_value(body: bytes) -> Any:
    return json.loads(body)["value"]


def _document(body: bytes) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(body)
    return doc


def _secrets(body: bytes) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = json.loads(body)["secrets"]
    return items


def document_call(path: str) -> Call[Any]:
    """Any GET answered with JSON, parsed."""
    return Call(path, _json)


def get_call(name: str, key: str | None, stage: str | None, version: str | None) -> Call[str]:
    """The value as text, or one ``key`` of a JSON secret as text."""
    return Call(secret_path(name, key=key, stage=stage, version=version, raw=True), _text)


def bytes_call(name: str, stage: str | None, version: str | None) -> Call[bytes]:
    """The value as bytes (text or binary secrets)."""
    return Call(secret_path(name, stage=stage, version=version, raw=True), _same)


def json_call(name: str, key: str | None, stage: str | None, version: str | None) -> Call[Any]:
    """The value parsed as JSON, or the JSON value of one ``key`` (from the document)."""
    if key is not None:
        return Call(secret_path(name, key=key, stage=stage, version=version), _json_value)
    return Call(secret_path(name, stage=stage, version=version, raw=True), _json)


def describe_call(
    name: str, key: str | None, stage: str | None, version: str | None
) -> Call[dict[str, Any]]:
    """The JSON document of a secret: value, version id, stages, created_at."""
    return Call(secret_path(name, key=key, stage=stage, version=version), _document)


LIST_CALL = Call("/v1/secrets", _secrets)
STATUS_CALL = Call("/v1/status", _document)
