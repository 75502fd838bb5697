"""Code written for the AWS Secrets Manager Agent / Lambda extension works against our TCP port.

This file is the list of upstream behaviours we match; each test's docstring
names the documented behaviour it checks (the AWS agent's README and config.rs,
and the Secrets Manager API reference for GetSecretValue).

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
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

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


# --------------------------------------------------------------------------------------
# secretId: a name, a full ARN or a partial ARN, on both routes.
#
# Upstream: GetSecretValue's SecretId is "the ARN or name of the secret"; "for an ARN,
# we recommend that you specify a complete ARN rather than a partial ARN" (Secrets
# Manager API reference). The AWS agent passes secretId through unchanged, on the query
# route (/secretsmanager/get?secretId=) and on the path route (<path_prefix><secretId>).


def _get(port: int, path: str, header: str = "X-Aws-Parameters-Secrets-Token") -> Any:
    request = urllib.request.Request(f"http://localhost:{port}{path}", headers={header: TOKEN})
    with urllib.request.urlopen(request, timeout=5) as resp:
        return json.loads(resp.read())


async def test_a_name_a_full_arn_and_a_partial_arn_read_the_same_secret_on_both_routes(
    agent: RunningAgent, example: tuple[ModuleType, int]
) -> None:
    """Upstream: SecretId is a name, a full ARN or a partial ARN, on either route."""
    _, port = example
    by_name = await asyncio.to_thread(_get, port, "/secretsmanager/get?secretId=prod/db")
    full = by_name["ARN"]
    # A full ARN ends in the name, "-" and six random characters, as on AWS.
    assert full.startswith("arn:aws:secretsmanager:") and full.split(":secret:")[1][:-7] == (
        "prod/db"
    )
    partial = full[:-7]
    for secret_id in ("prod/db", full, partial):
        for path in (f"/secretsmanager/get?secretId={secret_id}", f"/v1/{secret_id}"):
            doc = await asyncio.to_thread(_get, port, path)
            assert (doc["Name"], doc["ARN"]) == ("prod/db", full), path
    # The synthetic ARN is stable: the same on every answer and across restarts.
    assert (await asyncio.to_thread(_get, port, f"/v1/{partial}"))["ARN"] == full


async def test_a_full_arn_with_another_suffix_is_not_found(
    agent: RunningAgent, example: tuple[ModuleType, int]
) -> None:
    """Upstream: a full ARN names one secret; another suffix is ResourceNotFoundException."""
    _, port = example
    full = (await asyncio.to_thread(_get, port, "/v1/prod/db"))["ARN"]
    wrong = full[:-6] + ("AAAAAA" if full[-6:] != "AAAAAA" else "BBBBBB")
    status, body = await asyncio.to_thread(_http_error, lambda: _get(port, f"/v1/{wrong}"))
    assert (status, body["__type"]) == (400, "ResourceNotFoundException")


async def test_x_vault_token_is_accepted_like_the_aws_agent_does(
    agent: RunningAgent, example: tuple[ModuleType, int]
) -> None:
    """Upstream: ssrf_headers defaults to X-Aws-Parameters-Secrets-Token and X-Vault-Token."""
    _, port = example
    doc = await asyncio.to_thread(_get, port, "/v1/prod/db", "X-Vault-Token")
    assert json.loads(doc["SecretString"])["password"] == "first"
    status, body = await asyncio.to_thread(
        _http_error, lambda: _get(port, "/v1/prod/db", "X-Other-Token")
    )
    assert (status, body["__type"]) == (403, "AccessDeniedException")


# --------------------------------------------------------------------------------------
# On AWS Secrets Manager itself: real ARNs, plain mode with no key provider.


def _sm(server: Any) -> Any:
    import boto3

    return boto3.client("secretsmanager", region_name="us-east-1", endpoint_url=server.endpoint_url)


@pytest.mark.integration
async def test_plain_mode_needs_no_keys_and_answers_carry_the_real_arn(
    env: AgentEnv, moto_server: Any, example: tuple[ModuleType, int]
) -> None:
    """Upstream: answers are GetSecretValue's, so ARN is the secret's real ARN; a name,
    the full ARN and the partial ARN all find it (both routes). Plain mode (the AWS
    agent's only mode) is configured with ``keys: {}``."""
    _, port = example
    prefix = f"compat-{uuid.uuid4().hex[:8]}/"
    sm = _sm(moto_server)
    real = sm.create_secret(Name=f"{prefix}prod/db", SecretString='{"password": "aws"}')["ARN"]
    assert real.split(":secret:")[1][:-7] == f"{prefix}prod/db"  # moto adds the suffix
    config = yaml.safe_load(env.config_path.read_text())
    config.update(
        keys={},
        store={
            "type": "aws-secretsmanager",
            "region": "us-east-1",
            "endpoint_url": moto_server.endpoint_url,
            "name_prefix": prefix,
            "client_side_encryption": False,
        },
        listen={
            "socket": "./agent.sock",
            "tcp": {"address": f"127.0.0.1:{port}", "tokens": {"lambda": "env:AWS_SESSION_TOKEN"}},
        },
        access=[{"secrets": ["*"], "token": "lambda", "stages": ["*"]}],
    )
    config.pop("write_keys", None)
    env.config_path.write_text(yaml.safe_dump(config))
    assert env.cli("check-config")[0] == 0
    async with env.running():
        for secret_id in ("prod/db", real, real[:-7]):
            for path in (f"/secretsmanager/get?secretId={secret_id}", f"/v1/{secret_id}"):
                doc = await asyncio.to_thread(_get, port, path)
                assert (doc["Name"], doc["ARN"]) == ("prod/db", real), path
        # A partial ARN of another account is not this secret.
        other = real[:-7].replace(real.split(":")[4], "999999999999")
        status, body = await asyncio.to_thread(_http_error, lambda: _get(port, f"/v1/{other}"))
        assert (status, body["__type"]) == (400, "ResourceNotFoundException")
    code, _, err = env.cli("put", "prod/new", "--value", "x")
    assert code == 1 and "nothing can be written" in err


# --------------------------------------------------------------------------------------
# `run --aws-agent-config FILE`: the AWS agent's TOML config (README, "Configure the
# Secrets Manager Agent"; defaults and ranges from its config.rs).

TOML = """
log_level = "DEBUG"
http_port = "{port}"
ttl_seconds = 60
cache_size = '500'
ssrf_headers = ["X-My-Token"]
ssrf_env_variables = ["MY_TOKEN"]
path_prefix = "/secrets/"
max_conn = 10
region = "us-east-1"
log_to_file = true
"""


def test_the_aws_agent_toml_maps_onto_our_config(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each documented setting maps, or is reported as having no equivalent."""
    from agent.awsagent import load_with_aws_agent_config

    monkeypatch.setenv("MY_TOKEN", "file:///var/run/awssmatoken")
    path = tmp_path / "config.toml"
    path.write_text(TOML.format(port=2999))
    notes: list[str] = []
    config = load_with_aws_agent_config(None, path, report=notes.append)
    tcp = config.listen.tcp
    assert tcp is not None
    assert tcp.address == "127.0.0.1:2999"
    assert tcp.aws_path_prefix == "/secrets/" and tcp.max_connections == 10
    assert tcp.token_headers == ["X-Secrets-Agent-Token", "X-My-Token"]
    assert tcp.tokens == {"aws-agent": "file:///var/run/awssmatoken"}
    assert config.refresh.interval == 60 and config.log.level == "debug"
    assert config.store.type == "aws-secretsmanager" and config.store.region == "us-east-1"
    assert config.store.client_side_encryption is False and config.keys == {}
    assert any(r.token == "aws-agent" and r.secrets == ["*"] for r in config.access)
    assert [n.split(": ", 1)[1].split()[0] for n in notes] == ["cache_size:", "log_to_file"]
    assert all(n.startswith(f"{path}: ") and "no equivalent" in n for n in notes)


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ("http_port = 80", "http_port: expected 1024 to 65535"),
        ("ttl_seconds = 3601", "ttl_seconds: expected a whole number from 0 to 3600"),
        ("cache_size = 0", "cache_size: expected a whole number from 1 to 1000"),
        ("max_conn = 'many'", "max_conn: expected a whole number from 1 to 1000"),
        ("path_prefix = 'v1'", "path_prefix: expected a path starting with '/'"),
        ("log_level = 'loud'", "log_level: expected DEBUG, INFO, WARN, ERROR or NONE"),
        ("ssrf_headers = []", "ssrf_headers: expected a non-empty list of strings"),
        ("http_prot = 2773", "http_prot: unknown AWS agent setting"),
        ("http_port = ", "invalid TOML"),
    ],
)
def test_the_aws_agent_toml_is_refused_where_the_aws_agent_refuses_it(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    toml: str,
    message: str,
) -> None:
    """Upstream: unknown keys (deny_unknown_fields) and out-of-range values fail start-up."""
    from agent.cli import main

    monkeypatch.setenv("AWS_TOKEN", TOKEN)
    monkeypatch.delenv("SECRETS_AGENT_CONFIG", raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    path = tmp_path / "config.toml"
    path.write_text(toml + "\n")
    assert main(["run", "--aws-agent-config", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"{path}: " in err and message in err, err
    assert len(err.strip().splitlines()) == 1


def test_no_ssrf_token_variable_set_fails_start_up(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Upstream: the agent does not start without a token in one of ssrf_env_variables."""
    from agent.awsagent import load_with_aws_agent_config
    from agent.errors import ConfigError

    for var in ("AWS_TOKEN", "AWS_SESSION_TOKEN", "AWS_CONTAINER_AUTHORIZATION_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    path = tmp_path / "config.toml"
    path.write_text("")
    with pytest.raises(ConfigError, match="none of AWS_TOKEN, AWS_SESSION_TOKEN"):
        load_with_aws_agent_config(None, path)


@pytest.mark.integration
async def test_run_with_the_aws_agent_config_serves_as_the_aws_agent_would(
    tmp_path: Path, moto_server: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An AWS-agent user switches by changing one command: same port, header, prefix."""
    from agent.awsagent import load_with_aws_agent_config
    from agent.daemon import Daemon

    port = free_port()
    name = f"toml-{uuid.uuid4().hex[:8]}/db"
    arn = _sm(moto_server).create_secret(Name=name, SecretString="from-aws")["ARN"]
    monkeypatch.setenv("MY_TOKEN", TOKEN)
    monkeypatch.setenv("AWS_ENDPOINT_URL_SECRETS_MANAGER", moto_server.endpoint_url)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    path = tmp_path / "config.toml"
    path.write_text(TOML.format(port=port))
    config = load_with_aws_agent_config(None, path)
    config = config.model_copy(
        update={
            "listen": config.listen.model_copy(update={"socket": tmp_path / "a.sock"}),
            "metrics": config.metrics.model_copy(update={"listen": None}),
        }
    )
    daemon = Daemon(config)
    task = asyncio.create_task(daemon.run())
    try:

        def read() -> Any:
            return _get(port, f"/secrets/{arn}", "X-My-Token")

        doc = None
        for _ in range(300):  # bounded: 15 s at most
            try:
                doc = await asyncio.to_thread(read)
                break
            except (urllib.error.URLError, ConnectionError):
                await asyncio.sleep(0.05)
        assert doc is not None and (doc["SecretString"], doc["ARN"]) == ("from-aws", arn)
    finally:
        daemon.shutdown.set()
        await asyncio.wait_for(task, 15)
