"""A small client for apps: read secrets from the agent.

:class:`SecretsClient` uses only the standard library (this module imports
nothing else, so an app can vendor or import it without the agent's
dependencies); :class:`AsyncSecretsClient` uses aiohttp, imported when one is
created. Errors are typed: :class:`ClientError` and its subclasses carry the
HTTP status and the agent's error code, never a value or a token.

Where the agent is:

* the Unix socket (default): the ``socket_path`` argument, else
  ``$SECRETS_AGENT_SOCKET``, else the default
  (``/run/secrets-agent/agent.sock`` as root, else
  ``$XDG_RUNTIME_DIR/secrets-agent/agent.sock``);
* or the loopback TCP listener: ``base_url="http://127.0.0.1:2773"`` with
  ``token=`` (else ``$SECRETS_AGENT_TOKEN``), sent as
  ``X-Secrets-Agent-Token``. Only loopback hosts are accepted, so the token
  is never sent off the machine.
"""

from __future__ import annotations

import http.client
import ipaddress
import json
import os
import socket
import urllib.parse
from pathlib import Path
from typing import Any

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
    return Path(f"/tmp/secrets-agent-{os.getuid()}") / "agent.sock"  # noqa: S108


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


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: Path, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(str(self._path))
        except OSError:
            sock.close()
            raise
        self.sock = sock


class SecretsClient:
    """Synchronous client on the standard library (one connection per call)."""

    def __init__(
        self,
        socket_path: str | os.PathLike[str] | None = None,
        *,
        base_url: str | None = None,
        token: str | None = None,
        timeout: float = 5.0,
    ) -> None:
        self.timeout = timeout
        self.base_url = base_url
        self._tcp = _loopback_url(base_url) if base_url is not None else None
        self.socket_path = resolve_socket(socket_path) if self._tcp is None else None
        self._token = token if token is not None else os.environ.get("SECRETS_AGENT_TOKEN")

    def __repr__(self) -> str:
        where = self.base_url if self._tcp is not None else str(self.socket_path)
        return f"SecretsClient({where!r})"

    @property
    def where(self) -> str:
        """The socket path or base URL, for messages."""
        return self.base_url if self.base_url is not None else str(self.socket_path)

    def _connection(self) -> http.client.HTTPConnection:
        if self._tcp is not None:
            return http.client.HTTPConnection(*self._tcp, timeout=self.timeout)
        assert self.socket_path is not None
        return _UnixConnection(self.socket_path, self.timeout)

    def request(self, path: str) -> tuple[int, dict[str, str], bytes]:
        """GET ``path``; return status, headers and body (UnavailableError if unreachable)."""
        headers = {TOKEN_HEADER: self._token} if self._tcp is not None and self._token else {}
        conn = self._connection()
        try:
            conn.request("GET", path, headers=headers)
            resp = conn.getresponse()
            return resp.status, dict(resp.getheaders()), resp.read()
        except OSError as exc:
            raise UnavailableError(
                f"cannot reach the agent at {self.where}: {exc.strerror or exc}"
            ) from None
        finally:
            conn.close()

    def _checked(self, path: str) -> bytes:
        status, headers, body = self.request(path)
        raise_for(status, body, headers)
        return body

    def get_json_document(self, path: str) -> Any:
        """GET ``path`` and parse the JSON answer (typed errors on failure)."""
        return json.loads(self._checked(path))

    def get(
        self,
        name: str,
        key: str | None = None,
        stage: str | None = None,
        *,
        version: str | None = None,
    ) -> str:
        """The secret's value as text (or one ``key`` of a JSON secret, as text)."""
        path = secret_path(name, key=key, stage=stage, version=version, raw=True)
        return self._checked(path).decode("utf-8")

    def get_bytes(
        self, name: str, stage: str | None = None, *, version: str | None = None
    ) -> bytes:
        """The secret's value as bytes (text or binary secrets)."""
        return self._checked(secret_path(name, stage=stage, version=version, raw=True))

    def get_json(
        self,
        name: str,
        key: str | None = None,
        stage: str | None = None,
        *,
        version: str | None = None,
    ) -> Any:
        """The secret's value parsed as JSON (or the JSON value of one ``key``)."""
        if key is not None:
            return self.describe(name, key=key, stage=stage, version=version)["value"]
        return json.loads(self.get(name, stage=stage, version=version))

    def describe(
        self,
        name: str,
        *,
        key: str | None = None,
        stage: str | None = None,
        version: str | None = None,
    ) -> dict[str, Any]:
        """The JSON document of a secret: value, version id, stages, created_at."""
        doc: dict[str, Any] = self.get_json_document(
            secret_path(name, key=key, stage=stage, version=version)
        )
        return doc

    def list_secrets(self) -> list[dict[str, Any]]:
        """The secrets this process may read, with versions and stages (no values)."""
        items: list[dict[str, Any]] = self.get_json_document("/v1/secrets")["secrets"]
        return items

    def status(self) -> dict[str, Any]:
        """The agent's status document (no values)."""
        doc: dict[str, Any] = self.get_json_document("/v1/status")
        return doc


class AsyncSecretsClient:
    """Asyncio client on aiohttp. Use ``async with`` or call :meth:`aclose`."""

    def __init__(
        self,
        socket_path: str | os.PathLike[str] | None = None,
        *,
        base_url: str | None = None,
        token: str | None = None,
        timeout: float = 5.0,
    ) -> None:
        import aiohttp

        self.base_url = base_url
        headers: dict[str, str] = {}
        if base_url is not None:
            host, port = _loopback_url(base_url)
            self.socket_path = None
            self._root = f"http://{host}:{port}"
            connector: aiohttp.BaseConnector = aiohttp.TCPConnector()
            token = token if token is not None else os.environ.get("SECRETS_AGENT_TOKEN")
            if token:
                headers[TOKEN_HEADER] = token
        else:
            self.socket_path = resolve_socket(socket_path)
            self._root = "http://localhost"
            connector = aiohttp.UnixConnector(path=str(self.socket_path))
        self._session = aiohttp.ClientSession(
            connector=connector, headers=headers, timeout=aiohttp.ClientTimeout(total=timeout)
        )

    def __repr__(self) -> str:
        return f"AsyncSecretsClient({self.where!r})"

    @property
    def where(self) -> str:
        """The socket path or base URL, for messages."""
        return self.base_url if self.base_url is not None else str(self.socket_path)

    async def __aenter__(self) -> AsyncSecretsClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the connection pool."""
        await self._session.close()

    async def _get(self, path: str) -> bytes:
        import aiohttp

        try:
            async with self._session.get(self._root + path) as resp:
                body = await resp.read()
                raise_for(resp.status, body, dict(resp.headers))
                return body
        except aiohttp.ClientConnectionError as exc:
            raise UnavailableError(f"cannot reach the agent at {self.where}: {exc}") from None

    async def get(
        self,
        name: str,
        key: str | None = None,
        stage: str | None = None,
        *,
        version: str | None = None,
    ) -> str:
        """The secret's value as text (or one ``key`` of a JSON secret)."""
        body = await self._get(secret_path(name, key=key, stage=stage, version=version, raw=True))
        return body.decode("utf-8")

    async def get_bytes(
        self, name: str, stage: str | None = None, *, version: str | None = None
    ) -> bytes:
        """The secret's value as bytes (text or binary secrets)."""
        return await self._get(secret_path(name, stage=stage, version=version, raw=True))

    async def get_json(
        self,
        name: str,
        key: str | None = None,
        stage: str | None = None,
        *,
        version: str | None = None,
    ) -> Any:
        """The secret's value parsed as JSON (or the JSON value of one ``key``)."""
        if key is not None:
            doc = await self.describe(name, key=key, stage=stage, version=version)
            return doc["value"]
        return json.loads(await self.get(name, stage=stage, version=version))

    async def describe(
        self,
        name: str,
        *,
        key: str | None = None,
        stage: str | None = None,
        version: str | None = None,
    ) -> dict[str, Any]:
        """The JSON document of a secret: value, version id, stages, created_at."""
        body = await self._get(secret_path(name, key=key, stage=stage, version=version))
        doc: dict[str, Any] = json.loads(body)
        return doc

    async def list_secrets(self) -> list[dict[str, Any]]:
        """The secrets this process may read, with versions and stages (no values)."""
        items: list[dict[str, Any]] = json.loads(await self._get("/v1/secrets"))["secrets"]
        return items
