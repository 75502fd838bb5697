"""Issue 11, finding 6 (HTTP side): malformed requests get a JSON 4xx that echoes nothing.

Before: a token header with one bad byte got a plain-text 400 quoting the raw
header line (token included), and an ERROR traceback in the log quoting it
again; a request line without an HTTP version (``GET /path``) was served.
"""

from __future__ import annotations

import json
import logging

import pytest

from tests.agentenv import AgentEnv
from tests.reliability.agentproc import araw, status_of
from tests.reliability.conftest import Ports

MARKER = "SECRETMARKER-5be1"
MALFORMED = [
    b"X-Secrets-Agent-Token: tok\x01" + MARKER.encode(),
    b"X-Secrets-Agent-Token " + MARKER.encode(),
    b"X-Secrets-Agent-Token: a\r" + MARKER.encode(),
    b"X-Aws-Parameters-Secrets-Token: \x7f" + MARKER.encode(),
    b"X-Secrets-Agent-Token: " + MARKER.encode() + b"\x00",
]


def _request(header: bytes) -> bytes:
    return b"GET /v1/secrets/app/db HTTP/1.1\r\nHost: a\r\n" + header + b"\r\n\r\n"


@pytest.mark.parametrize("header", MALFORMED, ids=["ctl", "no-colon", "bare-cr", "del", "nul"])
async def test_a_malformed_token_header_gets_a_json_400_that_neither_echoes_nor_logs_it(
    env: AgentEnv, ports: Ports, caplog: pytest.LogCaptureFixture, header: bytes
) -> None:
    env.put("app/db", "the-value")
    caplog.set_level(logging.DEBUG)
    async with env.running():
        for where in ({"port": ports.tcp}, {"path": env.socket}):
            answer = await araw(_request(header), **where)  # type: ignore[arg-type]
            head, _, body = answer.partition(b"\r\n\r\n")
            assert status_of(answer) == 400, answer
            assert b"application/json" in head
            assert json.loads(body)["error"]["code"] == "bad_request"
            assert MARKER.encode() not in answer
            assert b"the-value" not in answer
    assert MARKER not in caplog.text
    assert "Traceback" not in caplog.text
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


@pytest.mark.parametrize(
    "line", [b"GET /v1/secrets/app/db", b"GET /healthz", b"GET /secretsmanager/get?secretId=app/db"]
)
async def test_a_request_line_without_an_http_version_is_refused(
    env: AgentEnv, ports: Ports, line: bytes
) -> None:
    env.put("app/db", "the-value")
    async with env.running():
        for where in ({"port": ports.tcp}, {"path": env.socket}, {"port": ports.metrics}):
            answer = await araw(line + b"\r\n\r\n", **where)  # type: ignore[arg-type]
            assert status_of(answer) == 400, answer
            assert b"the-value" not in answer
            assert b"healthy" not in answer and b'"ok"' not in answer


async def test_malformed_requests_are_logged_at_most_once_per_interval(
    env: AgentEnv, ports: Ports, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    async with env.running() as agent:
        for _ in range(50):
            assert status_of(await araw(_request(MALFORMED[0]), port=ports.tcp)) == 400
        status = (await agent.get("/v1/status"))[2]
    lines = [r for r in caplog.records if "malformed HTTP request" in r.getMessage()]
    assert 1 <= len(lines) <= 2
    assert json.loads(status)["connections"]["tcp"]["malformed"] == 50


@pytest.mark.parametrize("value", [b"\x80", b"\xff" + MARKER.encode(), b"200-ok", b""])
async def test_an_unknown_expect_header_gets_a_json_417_not_a_500(
    env: AgentEnv, ports: Ports, caplog: pytest.LogCaptureFixture, value: bytes
) -> None:
    # Found by the full HTTP fuzz run (2026-12-02): `Expect: \x80` made aiohttp's
    # own expect handler fail to encode its answer, before any middleware: a 500.
    env.put("app/db", "the-value")
    async with env.running():
        for where in ({"port": ports.tcp}, {"path": env.socket}, {"port": ports.metrics}):
            answer = await araw(
                b"GET /v1/secrets/app/db HTTP/1.1\r\nHost: a\r\nExpect: " + value + b"\r\n\r\n",
                **where,  # type: ignore[arg-type]
            )
            assert status_of(answer) == 417, answer
            body = answer.partition(b"\r\n\r\n")[2]
            assert json.loads(body)["error"]["code"] == "expectation_failed"
            assert MARKER.encode() not in answer and b"the-value" not in answer
        # The one expectation HTTP/1.1 defines still works.
        answer = await araw(
            b"GET /v1/secrets/app/db?format=raw HTTP/1.1\r\nHost: a\r\n"
            b"Expect: 100-continue\r\nConnection: close\r\n\r\n",
            path=env.socket,
        )
        assert answer.endswith(b"the-value"), answer
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
