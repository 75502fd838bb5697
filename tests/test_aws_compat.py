"""Code written for the AWS Secrets Manager Agent / Lambda extension works against our TCP port.

The client is ``examples/aws_style_client.py``: urllib, the
``X-Aws-Parameters-Secrets-Token`` header from ``AWS_SESSION_TOKEN``,
``/secretsmanager/get?secretId=``, ``SecretString``, written as AWS documents it.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import socket
import sys
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from tests.agentenv import AgentEnv, RunningAgent

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "aws_style_client.py"
TOKEN = "aws-style-session-token-5b1c"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def example(monkeypatch: pytest.MonkeyPatch) -> tuple[ModuleType, int]:
    """The example module, pointed (by environment, as on Lambda) at a free port."""
    port = free_port()
    monkeypatch.setenv("AWS_SESSION_TOKEN", TOKEN)
    monkeypatch.setenv("PARAMETERS_SECRETS_EXTENSION_HTTP_PORT", str(port))
    spec = importlib.util.spec_from_file_location("aws_style_client", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module, port


@pytest.fixture
async def agent(env: AgentEnv, example: tuple[ModuleType, int]) -> AsyncIterator[RunningAgent]:
    _, port = example
    env.configure(
        listen={
            "socket": "./agent.sock",
            "tcp": {"address": f"127.0.0.1:{port}", "tokens": {"lambda": "env:AWS_SESSION_TOKEN"}},
        },
        access=[
            {"secrets": ["*"], "uids": [os.getuid()]},
            {"secrets": ["prod/*"], "token": "lambda"},
        ],
    )
    env.put("prod/db", '{"username": "app", "password": "first"}')
    async with env.running() as running:
        yield running


def _http_error(call: Any) -> tuple[int, dict[str, Any]]:
    try:
        call()
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())
    raise AssertionError("expected an HTTP error")


async def test_the_aws_style_script_reads_a_secret_through_the_tcp_port(
    env: AgentEnv, agent: RunningAgent, example: tuple[ModuleType, int]
) -> None:
    module, port = example
    value = await asyncio.to_thread(module.get_secret, "prod/db")
    assert json.loads(value)["password"] == "first"
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        str(EXAMPLE),
        "prod/db",
        env={
            **os.environ,
            "AWS_SESSION_TOKEN": TOKEN,
            "PARAMETERS_SECRETS_EXTENSION_HTTP_PORT": str(port),
        },
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0, err.decode()
    assert out.decode().startswith("prod/db: 40 characters, ")
    assert "first" not in out.decode()


async def test_aws_previous_returns_the_previous_version_after_a_rotation(
    env: AgentEnv, agent: RunningAgent, example: tuple[ModuleType, int]
) -> None:
    module, _ = example
    env.put("prod/db", '{"username": "app", "password": "second"}')
    await agent.eventually("prod/db", b'{"username": "app", "password": "second"}')
    current = await asyncio.to_thread(module.get_secret_value, "prod/db")
    previous = await asyncio.to_thread(module.get_secret_value, "prod/db", "AWSPREVIOUS")
    assert json.loads(current["SecretString"])["password"] == "second"
    assert current["VersionStages"] == ["AWSCURRENT"]
    assert json.loads(previous["SecretString"])["password"] == "first"
    assert previous["VersionStages"] == ["AWSPREVIOUS"]
    assert previous["VersionId"] != current["VersionId"]


async def test_a_missing_secret_and_a_bad_query_answer_as_the_aws_agent_does(
    agent: RunningAgent, example: tuple[ModuleType, int]
) -> None:
    """Status codes and messages are the AWS agent's.

    For a missing secret the AWS agent passes Secrets Manager's answer through:
    400 and this exact body. For a bad query it answers 400 with the message
    as plain text; we send the same message in the ``{"__type", "message"}``
    shape, so clients that parse error bodies as JSON keep working.
    """
    module, port = example
    status, body = await asyncio.to_thread(_http_error, lambda: module.get_secret("prod/nope"))
    assert (status, body) == (
        400,
        {
            "__type": "ResourceNotFoundException",
            "message": "Secrets Manager can't find the specified secret.",
        },
    )

    def bad_query() -> None:
        url = f"http://localhost:{port}/secretsmanager/get?secretId=prod/db&abc=123"
        request = urllib.request.Request(url, headers={"X-Aws-Parameters-Secrets-Token": TOKEN})
        urllib.request.urlopen(request, timeout=5)

    status, body = await asyncio.to_thread(_http_error, bad_query)
    assert (status, body) == (
        400,
        {"__type": "InvalidParameterException", "message": "unknown parameter: abc"},
    )

    def no_token() -> None:
        url = f"http://localhost:{port}/secretsmanager/get?secretId=prod/db"
        urllib.request.urlopen(url, timeout=5)

    status, body = await asyncio.to_thread(_http_error, no_token)
    assert status == 403 and body["__type"] == "AccessDeniedException"


async def test_the_script_reports_an_aws_error_and_exits_1(
    agent: RunningAgent, example: tuple[ModuleType, int]
) -> None:
    _, port = example
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        str(EXAMPLE),
        "prod/nope",
        env={
            **os.environ,
            "AWS_SESSION_TOKEN": TOKEN,
            "PARAMETERS_SECRETS_EXTENSION_HTTP_PORT": str(port),
        },
        stderr=asyncio.subprocess.PIPE,
    )
    _, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 1
    assert err.decode().strip() == (
        "400 ResourceNotFoundException: Secrets Manager can't find the specified secret."
    )


async def test_the_path_style_and_ping_work_as_on_the_aws_agent(
    agent: RunningAgent, example: tuple[ModuleType, int]
) -> None:
    _, port = example

    def get(path: str, token: bool = True) -> tuple[int, bytes]:
        headers = {"X-Aws-Parameters-Secrets-Token": TOKEN} if token else {}
        request = urllib.request.Request(f"http://localhost:{port}{path}", headers=headers)
        with urllib.request.urlopen(request, timeout=5) as resp:
            return resp.status, resp.read()

    status, body = await asyncio.to_thread(get, "/v1/prod%2Fdb?versionStage=AWSCURRENT")
    assert status == 200 and json.loads(body)["Name"] == "prod/db"
    status, body = await asyncio.to_thread(get, "/v1/prod/db")
    assert status == 200 and json.loads(body)["Name"] == "prod/db"
    assert await asyncio.to_thread(get, "/ping", False) == (200, b"healthy")
