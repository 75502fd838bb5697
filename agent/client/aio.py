"""The asyncio client, on aiohttp (imported when a client is created)."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from agent.client._base import (
    LIST_CALL,
    STATUS_CALL,
    Call,
    ClientBase,
    T,
    bytes_call,
    describe_call,
    get_call,
    json_call,
    raise_for,
)

if TYPE_CHECKING:
    import aiohttp


class AsyncSecretsClient(ClientBase):
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

        super().__init__(socket_path, base_url=base_url, token=token)
        endpoint = self._endpoint
        connector: aiohttp.BaseConnector
        if endpoint.tcp is not None:
            host, port = endpoint.tcp
            self._root = f"http://{host}:{port}"
            connector = aiohttp.TCPConnector()
        else:
            self._root = "http://localhost"
            connector = aiohttp.UnixConnector(path=str(endpoint.socket_path))
        self._session = aiohttp.ClientSession(
            connector=connector,
            headers=endpoint.headers,
            timeout=aiohttp.ClientTimeout(total=timeout),
        )

    def __repr__(self) -> str:
        return f"AsyncSecretsClient({self.where!r})"

    async def __aenter__(self) -> AsyncSecretsClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the connection pool."""
        await self._session.close()

    async def _run(self, call: Call[T]) -> T:
        import aiohttp

        try:
            async with self._session.get(self._root + call.path) as resp:
                body = await resp.read()
                raise_for(resp.status, body, dict(resp.headers))
        except aiohttp.ClientConnectionError as exc:
            raise self._endpoint.unreachable(exc) from None
        return call.parse(body)

    async def get(
        self,
        name: str,
        key: str | None = None,
        stage: str | None = None,
        *,
        version: str | None = None,
    ) -> str:
        """The secret's value as text (or one ``key`` of a JSON secret)."""
        return await self._run(get_call(name, key, stage, version))

    async def get_bytes(
        self, name: str, stage: str | None = None, *, version: str | None = None
    ) -> bytes:
        """The secret's value as bytes (text or binary secrets)."""
        return await self._run(bytes_call(name, stage, version))

    async def get_json(
        self,
        name: str,
        key: str | None = None,
        stage: str | None = None,
        *,
        version: str | None = None,
    ) -> Any:
        """The secret's value parsed as JSON (or the JSON value of one ``key``)."""
        return await self._run(json_call(name, key, stage, version))

    async def describe(
        self,
        name: str,
        *,
        key: str | None = None,
        stage: str | None = None,
        version: str | None = None,
    ) -> dict[str, Any]:
        """The JSON document of a secret: value, version id, stages, created_at."""
        return await self._run(describe_call(name, key, stage, version))

    async def list_secrets(self) -> list[dict[str, Any]]:
        """The secrets this process may read, with versions and stages (no values)."""
        return await self._run(LIST_CALL)

    async def status(self) -> dict[str, Any]:
        """The agent's status document (no values)."""
        return await self._run(STATUS_CALL)
