"""The server over fakes: a World (store, keys, cache, audit) and both listeners, spec-checked.

Every answer a test gets through :class:`Served` is checked against
docs/openapi.yaml (status, documented headers, body schema), so the spec
stays true as the tests grow.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from multidict import CIMultiDictProxy
from yarl import URL

from agent.audit import AuditLog
from agent.cache import SecretCache
from agent.config import AccessRule, DataKeysConfig, RefreshConfig, TcpListenConfig
from agent.crypto.datakeys import DataKeys
from agent.metrics import Metrics
from agent.resolver import Resolver
from agent.server.access import AccessPolicy
from agent.server.app import ServerState, build_app, normalize_prefix
from agent.server.tcp import build_tcp_app, start_tcp_site
from agent.sockets import bind_unix_site
from agent.types import CURRENT
from agent.writer import SecretWriter
from tests.fakes import FakeKeyProvider, MemoryStore
from tests.server.spec import Spec

TOKEN_ENV = "SA_TEST_TCP_TOKEN"


@pytest.fixture(scope="session")
def spec() -> Spec:
    return Spec()


class World:
    """A store with secrets, the agent-side cache over it, and a ServerState with an audit log."""

    def __init__(self, audit_path: Path, rules: list[dict[str, Any]]) -> None:
        self.store = MemoryStore()
        self.provider = FakeKeyProvider("local")
        self.metrics = Metrics()
        datakeys = DataKeys(
            {"local": self.provider},
            write_keys=["local"],
            settings=DataKeysConfig(),
            metrics=self.metrics,
        )
        self.writer = SecretWriter(self.store.twin(), datakeys)
        self.cache = SecretCache(
            Resolver(self.store, datakeys, metrics=self.metrics),
            settings=RefreshConfig(request_min_interval=0),
            metrics=self.metrics,
        )
        self.audit_path = audit_path
        self.audit = AuditLog(audit_path, metrics=self.metrics)
        self.state = ServerState(
            self.cache, AccessPolicy([]), self.metrics, audit=self.audit, max_connections=50
        )
        self.state.ready.set()
        self.set_rules(rules)

    def set_rules(self, rules: list[dict[str, Any]]) -> None:
        """Replace the access rules, as a config reload does."""
        self.state.policy = AccessPolicy([AccessRule(**r) for r in rules])

    async def put(
        self, name: str, value: str | bytes, *, stage: str = CURRENT, binary: bool = False
    ) -> str:
        data = value.encode() if isinstance(value, str) else value
        result = await self.writer.put(
            name, data, stage=stage, value_type="binary" if binary else "string"
        )
        await self.cache.refresh(name)
        return result.version_id

    def records(self) -> list[dict[str, Any]]:
        """The audit records written so far."""
        return [json.loads(line) for line in self.audit_path.read_text().splitlines()]

    def decisions(self, listener: str, decision: str) -> float:
        value = self.metrics.registry.get_sample_value(
            "secrets_agent_access_decisions_total", {"listener": listener, "decision": decision}
        )
        return value or 0.0

    async def aclose(self) -> None:
        await self.audit.aclose()
        await self.cache.aclose()


@dataclass
class Answer:
    status: int
    headers: CIMultiDictProxy[str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


class Served:
    """One listener under test; every answer is checked against the spec."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        root: str,
        spec: Spec,
        headers: Mapping[str, str],
        *,
        socket: Path | None = None,
        port: int | None = None,
    ) -> None:
        self.session = session
        self.root = root
        self.spec = spec
        self.headers = dict(headers)
        self.socket = socket
        self.port = port

    async def request(
        self,
        path: str,
        *,
        method: str = "GET",
        params: Mapping[str, str] | None = None,
        headers: Mapping[str, str] | None = None,
        encoded: bool = False,
        token: bool = True,
    ) -> Answer:
        """Send one request; ``encoded=True`` sends ``path`` (with its query) as is."""
        url = URL(self.root + path, encoded=True) if encoded else URL(self.root + path)
        sent = {**(self.headers if token else {}), **(headers or {})}
        async with self.session.request(method, url, params=params, headers=sent) as resp:
            body = await resp.read()
            answer = Answer(resp.status, resp.headers, body)
            self.spec.check(method, resp.url.path_safe, resp.status, resp.headers, body)
        return answer

    async def get(self, path: str, **params: str) -> Answer:
        return await self.request(path, params=params or None)


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[World]:
    """Secrets in a memory store; the default rule lets root (the tests' uid) read ``app/*``."""
    w = World(tmp_path / "audit.log", [{"secrets": ["app/*"], "uids": [os.getuid()]}])
    try:
        yield w
    finally:
        await w.aclose()


@pytest.fixture
def short_dir() -> Any:
    """A short directory for Unix sockets (paths must stay under 108 bytes)."""
    directory = tempfile.mkdtemp(dir="/tmp", prefix="sa")
    os.chmod(directory, 0o711)
    yield Path(directory)
    shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def tcp_token(monkeypatch: pytest.MonkeyPatch) -> str:
    """The value of the TCP token named ``app`` (read from an environment variable)."""
    token = "tok-" + secrets.token_hex(16)
    monkeypatch.setenv(TOKEN_ENV, token)
    return token


ServeUnix = Callable[..., Awaitable[Served]]
ServeTcp = Callable[..., Awaitable[Served]]


@pytest.fixture
async def serve_unix(world: World, short_dir: Path, spec: Spec) -> AsyncIterator[ServeUnix]:
    """Start ``build_app(world.state)`` on a Unix socket; return a spec-checked client."""
    count: list[int] = []
    async with contextlib.AsyncExitStack() as stack:

        async def serve(*, mode: int = 0o600, **app_kw: Any) -> Served:
            runner = web.AppRunner(build_app(world.state, **app_kw), access_log=None)
            await runner.setup()
            stack.push_async_callback(runner.cleanup)
            count.append(1)
            path = short_dir / f"s{len(count)}.sock"
            await bind_unix_site(runner, path, mode=mode, group=None)
            session = aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=str(path)))
            stack.push_async_callback(session.close)
            prefix = app_kw.get("aws_path_prefix")
            checked = spec.with_aws_prefix(normalize_prefix(prefix)) if prefix else spec
            return Served(session, "http://localhost", checked, {}, socket=path)

        yield serve


@pytest.fixture
async def serve_tcp(world: World, tcp_token: str, spec: Spec) -> AsyncIterator[ServeTcp]:
    """Start the TCP listener app on 127.0.0.1 (free port); the client sends the token."""
    async with contextlib.AsyncExitStack() as stack:

        async def serve(**tcp_kw: Any) -> Served:
            cfg = TcpListenConfig(
                **{"address": "127.0.0.1:0", "tokens": {"app": f"env:{TOKEN_ENV}"}, **tcp_kw}
            )
            runner = web.AppRunner(build_tcp_app(world.state, cfg, base_dir=None), access_log=None)
            await runner.setup()
            stack.push_async_callback(runner.cleanup)
            _, port = await start_tcp_site(runner, cfg)
            session = aiohttp.ClientSession()
            stack.push_async_callback(session.close)
            return Served(
                session,
                f"http://127.0.0.1:{port}",
                spec,
                {"X-Secrets-Agent-Token": tcp_token},
                port=port,
            )

        yield serve
