"""The synchronous client, on the standard library only."""

from __future__ import annotations

import http.client
import os
import socket
import struct
from pathlib import Path
from typing import Any

from agent.client._base import (
    LIST_CALL,
    STATUS_CALL,
    Call,
    ClientBase,
    ClientError,
    T,
    bytes_call,
    describe_call,
    document_call,
    get_call,
    json_call,
    raise_for,
)


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: Path, timeout: float, server_uid: int | None = None) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path
        self._server_uid = server_uid

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(str(self._path))
            if self._server_uid is not None:
                _check_server(sock, self._path, self._server_uid)
        except BaseException:
            sock.close()
            raise
        self.sock = sock


class ImpostorError(ClientError):
    """The socket is served by another uid than the expected agent's."""


def _check_server(sock: socket.socket, path: Path, expected: int) -> None:
    """Refuse a server whose uid (SO_PEERCRED) is not ``expected``."""
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    if uid != expected:
        raise ImpostorError(
            f"the socket {path} is served by uid {uid}, not the agent's uid {expected}; "
            "refusing to talk to it",
            code="impostor",
        )


class SecretsClient(ClientBase):
    """Synchronous client on the standard library (one connection per call)."""

    def __init__(
        self,
        socket_path: str | os.PathLike[str] | None = None,
        *,
        base_url: str | None = None,
        token: str | None = None,
        timeout: float = 5.0,
        server_uid: int | None = None,
    ) -> None:
        """``server_uid`` (else ``$SECRETS_AGENT_SERVER_UID``): refuse a socket served
        by any other uid (SO_PEERCRED), e.g. one swapped in by another user."""
        self.timeout = timeout
        super().__init__(socket_path, base_url=base_url, token=token)
        env_uid = os.environ.get("SECRETS_AGENT_SERVER_UID", "")
        if server_uid is None and env_uid.isdigit():
            server_uid = int(env_uid)
        self.server_uid = server_uid

    def __repr__(self) -> str:
        return f"SecretsClient({self.where!r})"

    def _connection(self) -> http.client.HTTPConnection:
        if self._endpoint.tcp is not None:
            return http.client.HTTPConnection(*self._endpoint.tcp, timeout=self.timeout)
        assert self.socket_path is not None
        return _UnixConnection(self.socket_path, self.timeout, self.server_uid)

    def request(self, path: str) -> tuple[int, dict[str, str], bytes]:
        """GET ``path``; return status, headers and body (UnavailableError if unreachable)."""
        conn = self._connection()
        try:
            conn.request("GET", path, headers=self._endpoint.headers)
            resp = conn.getresponse()
            return resp.status, dict(resp.getheaders()), resp.read()
        except OSError as exc:
            raise self._endpoint.unreachable(exc) from None
        finally:
            conn.close()

    def _run(self, call: Call[T]) -> T:
        status, headers, body = self.request(call.path)
        raise_for(status, body, headers)
        return call.parse(body)

    def get_json_document(self, path: str) -> Any:
        """GET ``path`` and parse the JSON answer (typed errors on failure)."""
        return self._run(document_call(path))

    def get(
        self,
        name: str,
        key: str | None = None,
        stage: str | None = None,
        *,
        version: str | None = None,
    ) -> str:
        """The secret's value as text (or one ``key`` of a JSON secret, as text)."""
        return self._run(get_call(name, key, stage, version))

    def get_bytes(
        self, name: str, stage: str | None = None, *, version: str | None = None
    ) -> bytes:
        """The secret's value as bytes (text or binary secrets)."""
        return self._run(bytes_call(name, stage, version))

    def get_json(
        self,
        name: str,
        key: str | None = None,
        stage: str | None = None,
        *,
        version: str | None = None,
    ) -> Any:
        """The secret's value parsed as JSON (or the JSON value of one ``key``)."""
        return self._run(json_call(name, key, stage, version))

    def describe(
        self,
        name: str,
        *,
        key: str | None = None,
        stage: str | None = None,
        version: str | None = None,
    ) -> dict[str, Any]:
        """The JSON document of a secret: value, version id, stages, created_at."""
        return self._run(describe_call(name, key, stage, version))

    def list_secrets(self) -> list[dict[str, Any]]:
        """The secrets this process may read, with versions and stages (no values)."""
        return self._run(LIST_CALL)

    def status(self) -> dict[str, Any]:
        """The agent's status document (no values)."""
        return self._run(STATUS_CALL)
