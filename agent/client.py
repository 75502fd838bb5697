"""A small client for apps: read secrets from the agent's Unix socket.

``SecretsClient`` uses only the standard library (for apps that want no
dependencies); ``AsyncSecretsClient`` uses aiohttp. Errors are typed:
:class:`ClientError` and its subclasses carry the agent's error code.

The socket path comes from the argument, else ``$SECRETS_AGENT_SOCKET``, else
the default (``$XDG_RUNTIME_DIR/secrets-agent/agent.sock`` or
``/run/secrets-agent/agent.sock``).
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import urllib.parse
from pathlib import Path
from typing import Any

from agent.config import default_socket_path


class ClientError(Exception):
    """The agent answered with an error (``status``, ``code``) or could not be reached."""

    def __init__(self, message: str, *, status: int = 0, code: str = "unreachable") -> None:
        super().__init__(message)
        self.status = status
        self.code = code


class NotFoundError(ClientError):
    """404: no such secret, version, stage or key."""


class AccessDeniedError(ClientError):
    """403: this process may not read the secret (or it does not exist)."""


class UnavailableError(ClientError):
    """503 (or unreachable): the agent cannot serve the value now; retry later."""


_BY_STATUS: dict[int, type[ClientError]] = {
    403: AccessDeniedError,
    404: NotFoundError,
    503: UnavailableError,
}


def resolve_socket(path: str | os.PathLike[str] | None = None) -> Path:
    """The argument, else ``$SECRETS_AGENT_SOCKET``, else the default socket path."""
    if path is not None:
        return Path(path)
    env = os.environ.get("SECRETS_AGENT_SOCKET")
    return Path(env) if env else default_socket_path()


def _secret_path(
    name: str, *, key: str | None, stage: str | None, version: str | None, raw: bool = False
) -> str:
    query = {k: v for k, v in (("key", key), ("stage", stage), ("version", version)) if v}
    if raw:
        query["format"] = "raw"
    qs = f"?{urllib.parse.urlencode(query)}" if query else ""
    return f"/v1/secrets/{urllib.parse.quote(name, safe='/')}{qs}"


def _raise_for(status: int, body: bytes) -> None:
    if status < 400:
        return
    try:
        doc = json.loads(body)
        code, message = doc["error"]["code"], doc["error"]["message"]
    except (ValueError, KeyError, TypeError):
        code, message = "http_error", f"HTTP {status}"
    raise _BY_STATUS.get(status, ClientError)(message, status=status, code=code)


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
    """Synchronous client on the standard library."""

    def __init__(
        self, socket_path: str | os.PathLike[str] | None = None, *, timeout: float = 5.0
    ) -> None:
        self.socket_path = resolve_socket(socket_path)
        self.timeout = timeout

    def request(self, path: str) -> tuple[int, dict[str, str], bytes]:
        """GET ``path``; return status, headers and body (raises ClientError if unreachable)."""
        conn = _UnixConnection(self.socket_path, self.timeout)
        try:
            conn.request("GET", path)
            resp = conn.getresponse()
            return resp.status, dict(resp.getheaders()), resp.read()
        except OSError as exc:
            raise UnavailableError(
                f"cannot reach the agent at {self.socket_path}: {exc.strerror or exc}"
            ) from None
        finally:
            conn.close()

    def get_json_document(self, path: str) -> Any:
        status, _, body = self.request(path)
        _raise_for(status, body)
        return json.loads(body)

    def get(
        self,
        name: str,
        key: str | None = None,
        stage: str | None = None,
        version: str | None = None,
    ) -> str:
        """The secret's value as text (or one ``key`` of a JSON secret, as text)."""
        status, _, body = self.request(
            _secret_path(name, key=key, stage=stage, version=version, raw=True)
        )
        _raise_for(status, body)
        return body.decode("utf-8")

    def get_bytes(self, name: str, stage: str | None = None, version: str | None = None) -> bytes:
        """The secret's value as bytes (text or binary secrets)."""
        status, _, body = self.request(
            _secret_path(name, key=None, stage=stage, version=version, raw=True)
        )
        _raise_for(status, body)
        return body

    def get_json(self, name: str, stage: str | None = None, version: str | None = None) -> Any:
        """The secret's value parsed as JSON."""
        return json.loads(self.get(name, stage=stage, version=version))

    def describe(self, name: str, stage: str | None = None) -> dict[str, Any]:
        """The full JSON document of a secret (value, version id, stages)."""
        doc: dict[str, Any] = self.get_json_document(
            _secret_path(name, key=None, stage=stage, version=None)
        )
        return doc


class AsyncSecretsClient:
    """Asyncio client on aiohttp. Use ``async with`` or call :meth:`aclose`."""

    def __init__(
        self, socket_path: str | os.PathLike[str] | None = None, *, timeout: float = 5.0
    ) -> None:
        import aiohttp

        self.socket_path = resolve_socket(socket_path)
        self._session = aiohttp.ClientSession(
            connector=aiohttp.UnixConnector(path=str(self.socket_path)),
            timeout=aiohttp.ClientTimeout(total=timeout),
        )

    async def __aenter__(self) -> AsyncSecretsClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._session.close()

    async def _get(self, path: str) -> bytes:
        import aiohttp

        try:
            async with self._session.get(f"http://localhost{path}") as resp:
                body = await resp.read()
                _raise_for(resp.status, body)
                return body
        except aiohttp.ClientConnectionError as exc:
            raise UnavailableError(f"cannot reach the agent at {self.socket_path}: {exc}") from None

    async def get(
        self,
        name: str,
        key: str | None = None,
        stage: str | None = None,
        version: str | None = None,
    ) -> str:
        """The secret's value as text (or one ``key`` of a JSON secret)."""
        body = await self._get(_secret_path(name, key=key, stage=stage, version=version, raw=True))
        return body.decode("utf-8")

    async def get_json(
        self, name: str, stage: str | None = None, version: str | None = None
    ) -> Any:
        """The secret's value parsed as JSON."""
        return json.loads(await self.get(name, stage=stage, version=version))
