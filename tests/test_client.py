"""The app-side client (stdlib sync, aiohttp async) against a real agent, socket and TCP."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from agent import client as client_module
from agent import config as agent_config
from agent.client import (
    AccessDeniedError,
    AsyncSecretsClient,
    BadRequestError,
    NotFoundError,
    SecretsClient,
    UnavailableError,
)
from tests.agentenv import AgentEnv, RunningAgent

TOKEN_ENV = "SA_CLIENT_TEST_TOKEN"
TOKEN = "client-test-token-0d9e"
REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Live:
    """A running agent: its socket and its TCP port."""

    agent: RunningAgent
    socket: Path
    port: int


@pytest.fixture
async def live(env: AgentEnv, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Live]:
    """An agent with secrets, on its socket and on a loopback TCP port (token ``app``)."""
    monkeypatch.setenv(TOKEN_ENV, TOKEN)
    port = free_port()
    env.configure(
        listen={
            "socket": "./agent.sock",
            "tcp": {"address": f"127.0.0.1:{port}", "tokens": {"app": f"env:{TOKEN_ENV}"}},
        },
        access=[
            {"secrets": ["app/*"], "uids": [os.getuid()]},
            {"secrets": ["app/*"], "token": "app"},
        ],
    )
    env.put("app/db", '{"user": "u", "password": "pw", "port": 5432}')
    env.put("app/db", '{"user": "u", "password": "pw2", "port": 5432}')
    env.put("app/bin", bytes(range(256)), "--binary")
    env.put("other/x", "no")
    async with env.running() as running:
        yield Live(running, env.socket, port)


def _clients(live: Live) -> list[SecretsClient]:
    return [
        SecretsClient(live.socket),
        SecretsClient(base_url=f"http://127.0.0.1:{live.port}", token=TOKEN),
    ]


async def test_the_sync_client_reads_values_keys_json_and_bytes(live: Live) -> None:
    for client in _clients(live):
        assert await asyncio.to_thread(client.get, "app/db", key="password") == "pw2"
        assert await asyncio.to_thread(client.get, "app/db", "password", "PREVIOUS") == "pw"
        assert (await asyncio.to_thread(client.get_json, "app/db"))["user"] == "u"
        assert await asyncio.to_thread(client.get_json, "app/db", "port") == 5432
        assert await asyncio.to_thread(client.get_bytes, "app/bin") == bytes(range(256))
        doc = await asyncio.to_thread(client.describe, "app/db", stage="AWSPREVIOUS")
        assert doc["version_stages"] == ["PREVIOUS"]
        names = [s["name"] for s in await asyncio.to_thread(client.list_secrets)]
        assert names == ["app/bin", "app/db"]


async def test_the_sync_client_raises_typed_errors(live: Live) -> None:
    for client in _clients(live):
        with pytest.raises(NotFoundError) as missing:
            await asyncio.to_thread(client.get, "app/missing")
        assert (missing.value.status, missing.value.code) == (404, "secret_not_found")
        with pytest.raises(AccessDeniedError) as denied:
            await asyncio.to_thread(client.get, "other/x")
        assert denied.value.code == "access_denied"
        with pytest.raises(BadRequestError):
            await asyncio.to_thread(client.get, "bad//name")
        assert not denied.value.retryable


async def test_a_wrong_token_is_access_denied_and_never_echoed(live: Live) -> None:
    client = SecretsClient(base_url=f"http://localhost:{live.port}", token="wrong-token-9")
    with pytest.raises(AccessDeniedError) as exc:
        await asyncio.to_thread(client.get, "app/db")
    assert exc.value.code == "bad_token"
    assert "wrong-token-9" not in str(exc.value) + repr(client)


async def test_the_token_comes_from_the_environment_by_default(
    live: Live, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SECRETS_AGENT_TOKEN", TOKEN)
    client = SecretsClient(base_url=f"http://127.0.0.1:{live.port}")
    assert await asyncio.to_thread(client.get, "app/db", "user") == "u"


@pytest.mark.parametrize("transport", ["unix", "tcp"])
async def test_the_async_client_reads_over_both_transports(live: Live, transport: str) -> None:
    if transport == "unix":
        made = AsyncSecretsClient(live.socket)
    else:
        made = AsyncSecretsClient(base_url=f"http://127.0.0.1:{live.port}", token=TOKEN)
    async with made as client:
        assert await client.get("app/db", "password") == "pw2"
        assert await client.get_json("app/db", "port") == 5432
        assert (await client.get_json("app/db", stage="PREVIOUS"))["password"] == "pw"
        assert await client.get_bytes("app/bin") == bytes(range(256))
        assert [s["name"] for s in await client.list_secrets()] == ["app/bin", "app/db"]
        with pytest.raises(NotFoundError):
            await client.get("app/missing")
        with pytest.raises(AccessDeniedError):
            await client.get("other/x")


async def test_the_socket_comes_from_the_environment(
    live: Live, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SECRETS_AGENT_SOCKET", str(live.socket))
    assert SecretsClient().socket_path == live.socket
    async with AsyncSecretsClient() as client:
        assert await client.get("app/db", "user") == "u"


async def test_an_unreachable_agent_is_a_retryable_unavailable_error(tmp_path: Path) -> None:
    with pytest.raises(UnavailableError) as exc:
        SecretsClient(tmp_path / "nope.sock").get("a")
    assert exc.value.retryable and exc.value.status == 0
    async with AsyncSecretsClient(tmp_path / "nope.sock") as client:
        with pytest.raises(UnavailableError):
            await client.get("a")


@pytest.mark.parametrize(
    "url", ["http://10.0.0.1:2773", "http://example.com:2773", "https://127.0.0.1:2773", "x"]
)
def test_tokens_are_only_sent_to_loopback_http_urls(url: str) -> None:
    with pytest.raises(ValueError, match=r"refusing|expected a URL"):
        SecretsClient(base_url=url, token="t")


@pytest.mark.parametrize("euid", [0, 1000])
@pytest.mark.parametrize("xdg", [None, "/run/user/1000"])
def test_the_default_socket_matches_the_agents(
    monkeypatch: pytest.MonkeyPatch, euid: int, xdg: str | None
) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: euid)
    monkeypatch.delenv("SECRETS_AGENT_SOCKET", raising=False)
    if xdg is None:
        monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    else:
        monkeypatch.setenv("XDG_RUNTIME_DIR", xdg)
    assert client_module.default_socket_path() == agent_config.default_socket_path()
    assert client_module.resolve_socket() == agent_config.default_socket_path()


def test_the_sync_client_needs_only_the_standard_library() -> None:
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); import agent.client; "
        "bad = {'aiohttp', 'pydantic', 'yaml', 'agent.config'} & set(sys.modules); "
        "assert not bad, bad"
    )
    # -S: no site-packages, so any third-party import would fail here.
    done = subprocess.run(
        [sys.executable, "-S", "-c", code, str(REPO)], capture_output=True, check=False
    )
    assert done.returncode == 0, done.stderr.decode()
