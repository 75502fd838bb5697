"""The loopback TCP listener: tokens (constant time), forwarding refused, limits, loopback only."""

from __future__ import annotations

import asyncio
import hmac
import logging
import socket
from pathlib import Path
from typing import Any

import pytest

from agent.config import TcpListenConfig
from agent.errors import ConfigError
from agent.server.checks import TokenAuth
from agent.server.tcp import loopback_socket
from tests.server.conftest import ServeTcp, World

TOKEN_RULES: list[dict[str, Any]] = [
    {"secrets": ["app/*"], "token": "app"},
    {"secrets": ["*"], "uids": [0]},
]


async def test_a_token_caller_reads_what_its_token_rules_allow(
    world: World, serve_tcp: ServeTcp
) -> None:
    world.set_rules(TOKEN_RULES)
    await world.put("app/db", "v")
    await world.put("root/only", "r")
    api = await serve_tcp()
    answer = await api.get("/v1/secrets/app/db")
    assert answer.status == 200 and answer.json()["value"] == "v"
    # uid rules never apply on TCP: root's rule does not help a token caller.
    assert (await api.get("/v1/secrets/root/only")).status == 403
    read, denied = world.records()
    assert read["caller"] == {"listener": "tcp", "token": "app"}
    assert read["reason"] == "access[0]"
    assert denied["event"] == "denied"
    assert world.decisions("tcp", "allow") == 1


async def test_the_aws_token_header_is_accepted_too(
    world: World, serve_tcp: ServeTcp, tcp_token: str
) -> None:
    world.set_rules(TOKEN_RULES)
    await world.put("app/db", "v")
    api = await serve_tcp()
    answer = await api.request(
        "/v1/secrets/app/db", token=False, headers={"X-Aws-Parameters-Secrets-Token": tcp_token}
    )
    assert answer.status == 200


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"X-Secrets-Agent-Token": "wrong"},
        {"X-Aws-Parameters-Secrets-Token": ""},
        {"X-Secrets-Agent-Token": "TOKEN", "X-Aws-Parameters-Secrets-Token": "wrong"},
    ],
    ids=["none", "wrong", "empty", "conflicting"],
)
async def test_requests_without_a_valid_token_are_refused_and_audited(
    world: World, serve_tcp: ServeTcp, tcp_token: str, headers: dict[str, str]
) -> None:
    world.set_rules(TOKEN_RULES)
    await world.put("app/db", "v")
    api = await serve_tcp()
    sent = {k: tcp_token if v == "TOKEN" else v for k, v in headers.items()}
    for path, key in (
        ("/v1/secrets/app/db", "error"),
        ("/secretsmanager/get?secretId=app/db", "__type"),
    ):
        answer = await api.request(path, token=False, headers=sent, encoded=True)
        assert answer.status == 403
        assert key in answer.json()
    # Refusals are aggregated: the first is written at once, repeats as a count.
    (first,) = world.records()
    assert first["event"] == "denied"
    assert first["caller"] == {"listener": "tcp", "token": None}
    assert first["reason"] == "missing, unknown or conflicting token"
    await world.audit.aclose()
    _, repeats = world.records()
    assert repeats["count"] == 1 and repeats["reason"] == first["reason"]
    assert world.decisions("tcp", "deny") == 2


@pytest.mark.parametrize("header", ["X-Forwarded-For", "Forwarded"])
async def test_forwarded_requests_are_refused_even_with_a_valid_token(
    world: World, serve_tcp: ServeTcp, header: str
) -> None:
    world.set_rules(TOKEN_RULES)
    await world.put("app/db", "v")
    api = await serve_tcp()
    answer = await api.request("/v1/secrets/app/db", headers={header: "198.51.100.7"})
    assert answer.status == 400
    assert answer.json()["error"]["code"] == "forwarded"
    aws = await api.request("/v1/app/db", headers={header: "198.51.100.7"})
    assert aws.status == 400 and aws.json()["__type"] == "InvalidRequestException"


async def test_health_checks_need_no_token_but_everything_else_does(
    world: World, serve_tcp: ServeTcp
) -> None:
    api = await serve_tcp()
    ping = await api.request("/ping", token=False)
    assert ping.status == 200 and ping.body == b"healthy"
    assert (await api.request("/healthz", token=False)).status == 200
    for path in ("/readyz", "/metrics", "/v1/status", "/v1/secrets", "/v1/openapi.yaml"):
        assert (await api.request(path, token=False)).status == 403, path
        assert (await api.request(path)).status == 200, path


async def test_the_token_never_reaches_logs_audit_or_answers(
    world: World, serve_tcp: ServeTcp, tcp_token: str, caplog: pytest.LogCaptureFixture
) -> None:
    world.set_rules(TOKEN_RULES)
    await world.put("app/db", "v")
    with caplog.at_level(logging.DEBUG):
        api = await serve_tcp()
        bodies = [
            (await api.get("/v1/secrets/app/db")).body,
            (await api.get("/secretsmanager/get", secretId="app/db")).body,
            (await api.request("/v1/status")).body,
            (await api.request("/metrics")).body,
            (
                await api.request(
                    "/v1/secrets/app/db",
                    token=False,
                    headers={"X-Secrets-Agent-Token": tcp_token[:-1]},
                )
            ).body,
            (await api.request("/v1/secrets/app/db", headers={"X-Forwarded-For": "x"})).body,
        ]
    assert "refused" in caplog.text  # the refusals were logged, without the token
    for haystack in [caplog.text.encode(), world.audit_path.read_bytes(), *bodies]:
        assert tcp_token.encode() not in haystack
        assert tcp_token[:-1].encode() not in haystack


async def test_the_connection_limit_answers_429_in_the_aws_shape_on_aws_routes(
    world: World, serve_tcp: ServeTcp
) -> None:
    world.set_rules(TOKEN_RULES)
    await world.writer.put("app/slow", b"v")
    world.provider.gate = asyncio.Event()
    api = await serve_tcp(max_connections=1)
    first = asyncio.create_task(api.get("/secretsmanager/get", secretId="app/slow"))
    await asyncio.wait_for(world.provider.entered.wait(), 5)
    busy = await api.get("/secretsmanager/get", secretId="app/slow")
    assert busy.status == 429
    assert busy.json() == {"__type": "ThrottlingException", "message": "Connection limit exceeded"}
    assert (await api.request("/ping", token=False)).status == 200
    world.provider.gate.set()
    assert (await first).status == 200


def test_every_configured_token_is_compared_whether_or_not_one_matches(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    auth = TokenAuth({"a": b"alpha-token", "b": b"bravo-token", "c": b"charlie-token"})
    calls: list[int] = []
    real = hmac.compare_digest

    def counting(x: bytes, y: bytes) -> bool:
        calls.append(1)
        return real(x, y)

    monkeypatch.setattr(hmac, "compare_digest", counting)
    assert auth.identify(b"alpha-token") == "a"
    assert len(calls) == 3
    assert auth.identify(b"nope") is None
    assert len(calls) == 6


def test_token_references_are_read_once_and_bad_ones_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "tok").write_text("from-a-file\n")
    monkeypatch.setenv("SA_T2", "from-env")
    cfg = TcpListenConfig(tokens={"f": "file://tok", "e": "env:SA_T2"})
    auth = TokenAuth.from_config(cfg, base_dir=tmp_path)
    assert auth.identify(b"from-a-file") == "f"
    assert auth.identify(b"from-env") == "e"
    with pytest.raises(ConfigError, match="missing-file") as exc:
        TokenAuth.from_config(
            TcpListenConfig(tokens={"x": "file://missing-file"}), base_dir=tmp_path
        )
    assert "from-a-file" not in str(exc.value)
    monkeypatch.setenv("SA_T3", "")
    with pytest.raises(ConfigError, match=r"listen\.tcp\.tokens\.x: the token is empty"):
        TokenAuth.from_config(TcpListenConfig(tokens={"x": "env:SA_T3"}), base_dir=None)
    with pytest.raises(ConfigError, match="same value") as exc:
        TokenAuth({"a": b"same", "b": b"same"})
    assert "same'" not in str(exc.value).replace("same value", "")


def test_the_listener_binds_loopback_only_with_ttl_one() -> None:
    sock = loopback_socket("127.0.0.1:0")
    try:
        assert sock.getsockname()[0] == "127.0.0.1"
        assert sock.getsockopt(socket.IPPROTO_IP, socket.IP_TTL) == 1
    finally:
        sock.close()
    with pytest.raises(ConfigError, match="not a loopback address"):
        loopback_socket("0.0.0.0:0")
