"""An agent on AWS Secrets Manager (moto's standalone server over HTTP)."""

from __future__ import annotations

import base64
import json
import uuid
from typing import Any

import boto3
import pytest

from tests.agentenv import AgentEnv

pytestmark = pytest.mark.integration


def _sm(server: Any) -> Any:
    return boto3.client("secretsmanager", region_name="us-east-1", endpoint_url=server.endpoint_url)


async def test_existing_plain_aws_secrets_are_served_without_client_side_encryption(
    env: AgentEnv, moto_server: Any
) -> None:
    """Secrets an AWS user made with the AWS API, not by us, are served as they are."""
    prefix = f"plain-{uuid.uuid4().hex[:8]}/"
    sm = _sm(moto_server)
    sm.create_secret(
        Name=f"{prefix}app/db", SecretString=json.dumps({"username": "app", "password": "first"})
    )
    sm.put_secret_value(
        SecretId=f"{prefix}app/db",
        SecretString=json.dumps({"username": "app", "password": "second"}),
    )
    sm.create_secret(Name=f"{prefix}app/cert", SecretBinary=b"\x00\x01binary")
    env.configure(
        store={
            "type": "aws-secretsmanager",
            "region": "us-east-1",
            "endpoint_url": moto_server.endpoint_url,
            "name_prefix": prefix,
            "client_side_encryption": False,
        }
    )
    async with env.running() as agent:
        assert sorted(agent.daemon.cache.names()) == ["app/cert", "app/db"]
        assert await agent.value("app/db", key="password") == b"second"
        assert await agent.value("app/db", key="password", stage="AWSPREVIOUS") == b"first"
        _, _, body = await agent.get("/v1/secrets/app/cert")
        assert base64.b64decode(json.loads(body)["value_base64"]) == b"\x00\x01binary"
        # A rotation done with the AWS tools is picked up (here: forced check).
        sm.put_secret_value(
            SecretId=f"{prefix}app/db",
            SecretString=json.dumps({"username": "app", "password": "third"}),
        )
        status, _, body = await agent.get(
            "/v1/secrets/app/db", key="password", format="raw", refresh="true"
        )
        assert (status, body) == (200, b"third")
    code, _, err = env.cli("put", "app/new", "--value", "x")
    assert code == 1 and "read-only" in err


async def test_envelopes_in_secrets_manager_round_trip_through_the_agent(
    env: AgentEnv, moto_server: Any
) -> None:
    prefix = f"enc-{uuid.uuid4().hex[:8]}/"
    env.configure(
        store={
            "type": "aws-secretsmanager",
            "region": "us-east-1",
            "endpoint_url": moto_server.endpoint_url,
            "name_prefix": prefix,
        },
        refresh={"interval": "1s"},
    )
    env.put("prod/db", "v1")
    env.put("prod/db", "DISTINCTIVE-PLAINTEXT-v2")
    stored = _sm(moto_server).get_secret_value(
        SecretId=f"{prefix}prod/db", VersionStage="AWSCURRENT"
    )
    # AWS holds our envelope, not the value.
    assert b"DISTINCTIVE-PLAINTEXT" not in stored["SecretBinary"]
    assert json.loads(stored["SecretBinary"])["format"] == "secrets-agent/envelope"
    async with env.running() as agent:
        assert await agent.value("prod/db") == b"DISTINCTIVE-PLAINTEXT-v2"
        assert await agent.value("prod/db", stage="PREVIOUS") == b"v1"
        env.put("prod/db", "v3")
        await agent.eventually("prod/db", b"v3", timeout=30)  # polling every 1 s
