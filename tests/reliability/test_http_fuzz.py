"""Property: no byte sequence a client sends gets a 5xx, a crash, or a logged error.

Raw requests (request lines, methods, versions, header names and values with
any bytes, pipelining, bodies) on the Unix socket, the token port and the
metrics port of a running agent. The CI form sends a few thousand requests;
``RELIABILITY_FULL=1`` sends at least 200,000 (docs/reliability.md;
``SA_FUZZ_EXAMPLES`` changes the number of examples of 10 requests).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.agentenv import AgentEnv, RunningAgent
from tests.reliability.conftest import Ports

FULL = bool(os.environ.get("RELIABILITY_FULL") or os.environ.get("SA_RELIABILITY_FULL"))
BATCH = 10
EXAMPLES = int(os.environ.get("SA_FUZZ_EXAMPLES", 20_000 if FULL else 150))
VALUE = "fuzz-value-4e1d"
COUNTS: Counter[str] = Counter()

METHODS = [b"GET"] * 6 + [
    b"HEAD",
    b"POST",
    b"PUT",
    b"DELETE",
    b"OPTIONS",
    b"CONNECT",
    b"G\x00T",
    b"",
    b"GETT",
    b"get",
    b"PRI",
]
TARGETS = [
    b"/v1/secrets/app/db",
    b"/v1/secrets/app/db?format=raw",
    b"/v1/secrets/app/db?key=password&stage=PREVIOUS",
    b"/v1/secrets",
    b"/v1/status",
    b"/v1/app/db",
    b"/secretsmanager/get?secretId=app/db",
    b"/secretsmanager/get?secretId=app/db&versionStage=AWSPENDING",
    b"/metrics",
    b"/healthz",
    b"/readyz",
    b"/ping",
    b"*",
    b"http://localhost/v1/status",
    b"/v1/secrets/%zz",
    b"/v1/secrets/../../etc/passwd",
    b"/" + b"a" * 9000,
]
VERSIONS = [b" HTTP/1.1"] * 6 + [
    b" HTTP/1.0",
    b"",
    b" HTTP/2.0",
    b" HTTP/0.9",
    b" HTTP/1.1 x",
    b" http/1.1",
    b" HTTP/9.9",
    b"HTTP/1.1",
    b" HTTP/1.\xff",
]
HEADER_NAMES = [
    b"X-Secrets-Agent-Token",
    b"X-Aws-Parameters-Secrets-Token",
    b"X-Vault-Token",
    b"Host",
    b"Content-Length",
    b"Transfer-Encoding",
    b"X-Forwarded-For",
    b"Forwarded",
    b"Connection",
    b"Expect",
    b"Upgrade",
    b"Accept",
    b"X Bad",
    b"",
    b"\xff\xfe",
]
BYTES = st.binary(max_size=40)


@st.composite
def raw_request(draw: st.DrawFn, token: bytes) -> tuple[str, bytes]:
    listener = draw(st.sampled_from(["unix", "tcp", "tcp", "metrics"]))
    if draw(st.integers(0, 2)) == 0:  # a third well-formed, to reach the read path
        target = draw(st.sampled_from(TARGETS[:12]))
        auth = b"X-Secrets-Agent-Token: " + token + b"\r\n" if listener == "tcp" else b""
        return listener, b"GET " + target + b" HTTP/1.1\r\nHost: a\r\n" + auth + b"\r\n"
    method = draw(st.sampled_from(METHODS))
    target = draw(st.one_of(st.sampled_from(TARGETS), BYTES.map(lambda b: b"/" + b)))
    version = draw(st.sampled_from(VERSIONS))
    lines = [method + b" " + target + version]
    if draw(st.integers(0, 4)):
        lines.append(b"Host: localhost")
    if listener == "tcp" and draw(st.integers(0, 3)):
        lines.append(b"X-Secrets-Agent-Token: " + token)
    for _ in range(draw(st.integers(0, 3))):
        name = draw(st.one_of(st.sampled_from(HEADER_NAMES), BYTES))
        value = draw(
            st.one_of(
                BYTES,
                st.sampled_from(
                    [token, b"chunked", b"100-continue", b"-1", b"99999999999", b"close"]
                ),
            )
        )
        lines.append(name + draw(st.sampled_from([b": ", b":", b" : ", b""])) + value)
    body = draw(st.sampled_from([b"", b"", b"", b"x" * 10, b"0\r\n\r\n"]))
    end = draw(st.sampled_from([b"\r\n\r\n"] * 8 + [b"\n\n", b"\r\n", b""]))
    return listener, b"\r\n".join(lines) + end + body


async def _exchange(agent: RunningAgent, ports: Ports, listener: str, data: bytes) -> bytes:
    if listener == "unix":
        reader, writer = await asyncio.open_unix_connection(str(agent.daemon.config.listen.socket))
    else:
        port = ports.tcp if listener == "tcp" else ports.metrics
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        with contextlib.suppress(ConnectionError):
            await writer.drain()
        # An incomplete request waits for more bytes: no answer is coming, do not wait long.
        complete = b"\r\n\r\n" in data or b"\n\n" in data
        with contextlib.suppress(ConnectionError, TimeoutError):
            return await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5 if complete else 0.05)
        return b""
    except asyncio.IncompleteReadError as exc:
        return exc.partial
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


@pytest.fixture
async def fuzzed(env: AgentEnv, ports: Ports) -> AsyncIterator[tuple[RunningAgent, Ports]]:
    import yaml

    doc = yaml.safe_load(env.config_path.read_text())
    doc["listen"]["connections"] = {"header_timeout": "2s"}
    env.config_path.write_text(yaml.safe_dump(doc))
    env.put("app/db", json.dumps({"password": VALUE}))
    async with env.running() as agent:
        yield agent, ports


@pytest.mark.timeout(6 * 3600 if FULL else 300)
@settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
    ],
)
@given(data=st.data())
async def test_raw_requests_never_get_a_5xx_and_never_leak(
    fuzzed: tuple[RunningAgent, Ports], data: st.DataObject
) -> None:
    agent, ports = fuzzed
    size = BATCH if FULL else data.draw(st.integers(1, BATCH))
    for _ in range(size):
        listener, raw = data.draw(raw_request(ports.token.encode()))
        answer = await _exchange(agent, ports, listener, raw)
        COUNTS["requests"] += 1
        status = answer.split(b" ", 2)[1] if answer.count(b" ") >= 2 else b""
        COUNTS[f"status {status.decode(errors='replace') or 'none'}"] += 1
        assert not status.startswith(b"5"), (listener, raw, answer)


async def test_after_the_fuzz_the_agent_still_serves_and_logged_no_error(
    env: AgentEnv, ports: Ports, caplog: pytest.LogCaptureFixture, record_property: Any
) -> None:
    """Runs the property above in-process once more, then checks health and the log."""
    caplog.set_level(logging.INFO)
    env.put("app/db", json.dumps({"password": VALUE}))
    async with env.running() as agent:
        rounds = 200 if FULL else 20
        import random

        rng = random.Random(11)
        for _ in range(rounds):
            garbage = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 200)))
            await _exchange(agent, ports, rng.choice(["unix", "tcp", "metrics"]), garbage)
        status, _, body = await agent.get("/v1/secrets/app/db", key="password", format="raw")
        assert status == 200 and body == VALUE.encode()
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert "Traceback" not in caplog.text
    assert VALUE not in caplog.text
    record_property("fuzz_counts", dict(COUNTS))
    print("FUZZ COUNTS", json.dumps(dict(COUNTS)))
    if FULL:  # 200,000 with the default 20,000 examples of 10
        assert COUNTS["requests"] >= EXAMPLES * BATCH
