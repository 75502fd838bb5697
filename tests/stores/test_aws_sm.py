"""The AWS Secrets Manager store on moto's standalone server, and its error mapping.

The shared contract suite covers the store API with envelopes; these tests
cover the AWS mapping: plain secrets that AWS users made themselves
(``client_side_encryption: false``), AWS's own stage moves, moto's quirk of
answering a bare GetSecretValue with a stale value, and which AWS failures
are transient.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import boto3
import pytest
from botocore.exceptions import ClientError

from agent.aws import map_error
from agent.cache import SecretCache
from agent.core import Core
from agent.errors import (
    AccessDenied,
    BackendUnavailable,
    BadRequest,
    NotFound,
    SecretNotFound,
    VersionNotFound,
)
from agent.metrics import Metrics
from agent.stores.aws_sm import WRITTEN, SecretsManagerStore, from_token, to_token
from tests.agentenv import AgentEnv
from tests.servers import MotoServer

REGION = "us-east-1"


def _sm(moto: MotoServer) -> Any:
    return boto3.client("secretsmanager", region_name=REGION, endpoint_url=moto.endpoint_url)


@contextlib.asynccontextmanager
async def _store(endpoint_url: str, prefix: str, **kw: Any) -> AsyncIterator[SecretsManagerStore]:
    store = SecretsManagerStore(region=REGION, endpoint_url=endpoint_url, name_prefix=prefix, **kw)
    try:
        yield store
    finally:
        await store.aclose()


def _ops(metrics: Metrics, operation: str, outcome: str = "ok") -> float:
    sample = metrics.registry.get_sample_value(
        "secrets_agent_store_operations_total", {"operation": operation, "outcome": outcome}
    )
    return sample or 0.0


@pytest.fixture
def plain(moto_server: MotoServer) -> dict[str, Any]:
    """Secrets an AWS user made with boto3: JSON text rotated once, a binary, a custom label."""
    prefix = f"plain-{uuid.uuid4().hex[:8]}/"
    sm = _sm(moto_server)
    db = f"{prefix}app/db"
    first = sm.create_secret(Name=db, SecretString=json.dumps({"password": "first"}))
    second = sm.put_secret_value(SecretId=db, SecretString=json.dumps({"password": "second"}))
    cert = sm.create_secret(Name=f"{prefix}app/cert", SecretBinary=b"\x00\x01binary\xff")
    return {"prefix": prefix, "sm": sm, "first": first, "second": second, "cert": cert}


# --------------------------------------------------------------------------- plain AWS secrets


@pytest.mark.integration
async def test_plain_aws_secrets_are_read_as_aws_stores_them(
    moto_server: MotoServer, plain: dict[str, Any]
) -> None:
    async with _store(
        moto_server.endpoint_url, plain["prefix"], client_side_encryption=False
    ) as store:
        assert store.plaintext
        assert await store.list_names() == ["app/cert", "app/db"]
        state = await store.read_stages("app/db")
        assert dict(state.stages) == {
            "CURRENT": plain["second"]["VersionId"],
            "PREVIOUS": plain["first"]["VersionId"],
        }
        current = await store.read_version("app/db", state.stages["CURRENT"])
        previous = await store.read_version("app/db", state.stages["PREVIOUS"])
        # One marker byte, then the value: 0 for SecretString, 1 for SecretBinary.
        assert current.envelope == b"\x00" + json.dumps({"password": "second"}).encode()
        assert previous.envelope == b"\x00" + json.dumps({"password": "first"}).encode()
        assert abs(current.created_at - datetime.now(UTC)) < timedelta(minutes=5)
        cert = await store.read_stages("app/cert")
        blob = await store.read_version("app/cert", cert.stages["CURRENT"])
        assert blob.envelope == b"\x01\x00\x01binary\xff"


@pytest.mark.integration
async def test_plain_aws_secrets_are_served_through_the_cache_as_text_and_binary(
    env: AgentEnv, moto_server: MotoServer, plain: dict[str, Any]
) -> None:
    env.configure(
        store={
            "type": "aws-secretsmanager",
            "region": REGION,
            "endpoint_url": moto_server.endpoint_url,
            "name_prefix": plain["prefix"],
            "client_side_encryption": False,
        }
    )
    config = env.config()
    core = Core.build(config)
    cache = SecretCache(core.resolver, settings=config.refresh, metrics=core.metrics)
    try:
        db = (await cache.get("app/db")).secret
        assert (db.value.json_key("password"), db.value_type) == ("second", "string")
        old = (await cache.get("app/db", stage="AWSPREVIOUS")).secret
        assert old.value.json_key("password") == "first"
        cert = (await cache.get("app/cert")).secret
        assert (cert.value.reveal(), cert.value_type) == (b"\x00\x01binary\xff", "binary")
    finally:
        await cache.aclose()
        await core.aclose()


@pytest.mark.integration
async def test_a_stage_moved_back_with_the_aws_api_is_read_by_version_not_by_a_bare_get(
    moto_server: MotoServer, plain: dict[str, Any]
) -> None:
    """moto answers a bare GetSecretValue with the old value after a stage move."""
    sm, name = plain["sm"], f"{plain['prefix']}app/db"
    sm.update_secret_version_stage(
        SecretId=name,
        VersionStage="AWSCURRENT",
        MoveToVersionId=plain["first"]["VersionId"],
        RemoveFromVersionId=plain["second"]["VersionId"],
    )
    async with _store(
        moto_server.endpoint_url, plain["prefix"], client_side_encryption=False
    ) as store:
        state = await store.read_stages("app/db")
        assert state.stages["CURRENT"] == plain["first"]["VersionId"]
        value = await store.read_version("app/db", state.stages["CURRENT"])
        assert json.loads(value.envelope[1:]) == {"password": "first"}


@pytest.mark.integration
async def test_a_plaintext_store_refuses_every_write_before_calling_aws(
    moto_server: MotoServer, plain: dict[str, Any]
) -> None:
    metrics = Metrics()
    async with _store(
        moto_server.endpoint_url, plain["prefix"], client_side_encryption=False, metrics=metrics
    ) as store:
        for call in (
            store.write_version("app/new", "v1", b"x"),
            store.set_stages("app/db", {"CURRENT": "v1"}, expected_revision=""),
        ):
            with pytest.raises(AccessDenied, match="client_side_encryption is false"):
                await call
        with pytest.raises(BadRequest, match="immutable"):
            await store.replace_envelope("app/db", "v1", b"x", expected=b"y")
    assert _ops(metrics, "write_version") == _ops(metrics, "set_stages") == 0
    assert "app/new" not in [s["Name"] for s in plain["sm"].list_secrets()["SecretList"]]


# --------------------------------------------------------------------------- our envelopes


@pytest.mark.integration
async def test_envelopes_are_secret_binary_with_aws_stage_labels(moto_server: MotoServer) -> None:
    prefix = f"enc-{uuid.uuid4().hex[:8]}/"
    async with _store(moto_server.endpoint_url, prefix) as store:
        await store.write_version("db", "v1", b"envelope one")
        await store.write_version("db", "v2", b"envelope two")
        assert (await store.read_stages("db")).stages == {}  # unstaged until the first move
        state = await store.set_stages(
            "db", {"CURRENT": "v2", "PREVIOUS": "v1"}, expected_revision=""
        )
        assert dict(state.stages) == {"CURRENT": "v2", "PREVIOUS": "v1"}
    aws = _sm(moto_server)
    described = aws.describe_secret(SecretId=f"{prefix}db")
    labels = {from_token(t): set(s) - {WRITTEN} for t, s in described["VersionIdsToStages"].items()}
    assert labels == {"v2": {"AWSCURRENT"}, "v1": {"AWSPREVIOUS"}}
    got = aws.get_secret_value(SecretId=f"{prefix}db", VersionStage="AWSCURRENT")
    assert got["SecretBinary"] == b"envelope two"


@pytest.mark.integration
async def test_awspending_left_on_the_current_version_is_a_finished_rotation(
    moto_server: MotoServer,
) -> None:
    """Two agents finishing one rotation can leave AWSPENDING beside AWSCURRENT
    (labels move one call at a time): our maps leave it out, so the finished
    map still matches its proof; the next PENDING move takes the label over.
    Plain AWS secrets keep showing it, as AWS does."""
    prefix = f"enc-{uuid.uuid4().hex[:8]}/"
    aws = _sm(moto_server)
    async with _store(moto_server.endpoint_url, prefix) as store:
        for vid in ("v1", "v2", "v3"):
            await store.write_version("db", vid, f"envelope {vid}".encode())
        state = await store.set_stages(
            "db", {"CURRENT": "v2", "PREVIOUS": "v1"}, expected_revision=""
        )
        aws.update_secret_version_stage(
            SecretId=f"{prefix}db", VersionStage="AWSPENDING", MoveToVersionId=to_token("v2")
        )
        state = await store.read_stages("db")
        assert dict(state.stages) == {"CURRENT": "v2", "PREVIOUS": "v1"}
        state = await store.set_stages(
            "db",
            {"CURRENT": "v2", "PREVIOUS": "v1", "PENDING": "v3"},
            expected_revision=state.revision,
        )
        assert dict(state.stages) == {"CURRENT": "v2", "PREVIOUS": "v1", "PENDING": "v3"}
        aws.update_secret_version_stage(
            SecretId=f"{prefix}db",
            VersionStage="AWSPENDING",
            MoveToVersionId=to_token("v1"),
            RemoveFromVersionId=to_token("v3"),
        )
        assert (await store.read_stages("db")).stages["PENDING"] == "v1"  # not CURRENT's
    async with _store(moto_server.endpoint_url, prefix, client_side_encryption=False) as plain:
        aws.update_secret_version_stage(
            SecretId=f"{prefix}db",
            VersionStage="AWSPENDING",
            MoveToVersionId=to_token("v2"),
            RemoveFromVersionId=to_token("v1"),
        )
        stages = (await plain.read_stages("db")).stages
        assert stages["PENDING"] == stages["CURRENT"]


@pytest.mark.integration
async def test_the_cheap_check_is_one_describe_secret(moto_server: MotoServer) -> None:
    metrics = Metrics()
    prefix = f"cheap-{uuid.uuid4().hex[:8]}/"
    async with _store(moto_server.endpoint_url, prefix, metrics=metrics) as store:
        await store.write_version("db", "v1", b"e")
        first = await store.set_stages("db", {"CURRENT": "v1"}, expected_revision="")
        before = _ops(metrics, "read_stages")
        assert await store.read_stages("db") == first
        assert _ops(metrics, "read_stages") - before == 1
        assert _ops(metrics, "read_version") == 0


@pytest.mark.integration
async def test_a_secret_scheduled_for_deletion_is_gone(moto_server: MotoServer) -> None:
    prefix = f"del-{uuid.uuid4().hex[:8]}/"
    async with _store(moto_server.endpoint_url, prefix) as store:
        await store.write_version("db", "v1", b"e")
        _sm(moto_server).delete_secret(SecretId=f"{prefix}db", RecoveryWindowInDays=7)
        assert await store.list_names() == []
        with pytest.raises(SecretNotFound):
            await store.read_stages("db")
        with pytest.raises(NotFound):
            await store.read_version("db", "v1")


@pytest.mark.integration
async def test_a_missing_version_of_an_existing_secret_is_version_not_found(
    moto_server: MotoServer,
) -> None:
    async with _store(moto_server.endpoint_url, f"v-{uuid.uuid4().hex[:8]}/") as store:
        await store.write_version("db", "v1", b"e")
        with pytest.raises(VersionNotFound):
            await store.read_version("db", "v9")


def test_version_ids_become_client_request_tokens_and_back() -> None:
    for vid in ("v1", "a" * 32, str(uuid.uuid4()), "x" * 64):
        token = to_token(vid)
        assert 32 <= len(token) <= 64
        assert from_token(token) == vid
    with pytest.raises(BadRequest):
        to_token("x" * 65)


# --------------------------------------------------------------------------- failures


def _client_error(code: str, status: int) -> ClientError:
    return ClientError(
        {"Error": {"Code": code, "Message": "m"}, "ResponseMetadata": {"HTTPStatusCode": status}},
        "GetSecretValue",
    )


@pytest.mark.parametrize(
    ("code", "status", "expected"),
    [
        ("ThrottlingException", 400, BackendUnavailable),
        ("TooManyRequestsException", 429, BackendUnavailable),
        ("InternalServiceError", 500, BackendUnavailable),
        ("ServiceUnavailable", 503, BackendUnavailable),
        ("SomethingNew", 502, BackendUnavailable),
        ("AccessDeniedException", 400, AccessDenied),
        ("UnrecognizedClientException", 400, AccessDenied),
        ("ExpiredTokenException", 400, AccessDenied),
        ("ResourceNotFoundException", 400, NotFound),
        ("InvalidRequestException", 400, BadRequest),
    ],
)
def test_aws_errors_are_transient_only_for_throttling_and_5xx(
    code: str, status: int, expected: type[Exception]
) -> None:
    err = map_error(_client_error(code, status), what="secretsmanager read_stages")
    assert type(err) is expected
    assert "secretsmanager read_stages" in err.message


class _FailingClient:
    """Stands in for the aiobotocore client: every call raises ``error``."""

    def __init__(self, error: Exception) -> None:
        self.error = error

    def __getattr__(self, method: str) -> Any:
        async def call(**kw: Any) -> Any:
            raise self.error

        return call


@pytest.mark.parametrize(
    ("code", "expected", "outcome"),
    [
        ("ThrottlingException", BackendUnavailable, "unavailable"),
        ("AccessDeniedException", AccessDenied, "error"),
        ("ResourceNotFoundException", SecretNotFound, "not_found"),
    ],
)
async def test_the_store_maps_and_counts_aws_failures(
    code: str, expected: type[Exception], outcome: str
) -> None:
    metrics = Metrics()
    store = SecretsManagerStore(region=REGION, metrics=metrics)
    store._aws._client = _FailingClient(_client_error(code, 400))
    with pytest.raises(expected):
        await store.read_stages("db")
    assert _ops(metrics, "read_stages", outcome) == 1


@pytest.mark.integration
async def test_a_server_that_never_answers_is_unavailable_within_the_timeout(
    moto_server: MotoServer,
) -> None:
    """A black hole (accepts, never answers): the call times out as transient."""
    held: list[asyncio.StreamWriter] = []

    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)

    server = await asyncio.start_server(hold, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    loop = asyncio.get_running_loop()
    try:
        async with _store(f"http://127.0.0.1:{port}", "", timeout=0.5) as store:
            started = loop.time()
            with pytest.raises(BackendUnavailable):
                await store.read_stages("db")
            assert loop.time() - started < 10  # 2 attempts of 0.5 s, plus retry backoff
    finally:
        server.close()
        for writer in held:
            writer.transport.abort()
