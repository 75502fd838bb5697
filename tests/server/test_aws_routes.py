"""The AWS-compatible routes on both listeners: GetSecretValue shape, errors, precedence."""

from __future__ import annotations

import base64
import os
from typing import Any

import pytest

from agent.server.arn import synthetic_suffix as suffix
from tests.server.conftest import Served, ServeTcp, ServeUnix, World

NO_VALUE = "Secrets Manager can't find the specified secret value"
RULES: list[dict[str, Any]] = [
    {"secrets": ["app/*", "status", "secrets/x"], "uids": [os.getuid()], "stages": ["*"]},
    {"secrets": ["app/*", "status", "secrets/x"], "token": "app", "stages": ["*"]},
]


@pytest.fixture(params=["unix", "tcp"])
async def api(
    request: pytest.FixtureRequest, world: World, serve_unix: ServeUnix, serve_tcp: ServeTcp
) -> Served:
    world.set_rules(RULES)
    return await (serve_unix() if request.param == "unix" else serve_tcp())


async def test_get_secret_value_has_the_aws_shape(world: World, api: Served) -> None:
    version = await world.put("app/db", '{"password": "pw"}')
    answer = await api.get("/secretsmanager/get", secretId="app/db")
    assert answer.status == 200
    doc = answer.json()
    assert list(doc) == ["ARN", "Name", "VersionId", "SecretString", "VersionStages", "CreatedDate"]
    # Synthetic, stable, shaped like AWS's: the name, "-" and six characters.
    assert (
        doc["ARN"] == f"arn:aws:secretsmanager:local:000000000000:secret:app/db-{suffix('app/db')}"
    )
    assert doc["Name"] == "app/db"
    assert doc["VersionId"] == version
    assert doc["SecretString"] == '{"password": "pw"}'
    assert doc["VersionStages"] == ["AWSCURRENT"]
    created = (await api.get("/v1/secrets/app/db")).json()["created_at"]
    assert isinstance(doc["CreatedDate"], float)
    assert abs(doc["CreatedDate"] - _epoch(created)) < 0.001
    assert answer.headers["Cache-Control"] == "no-store"


def _epoch(iso: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(iso).timestamp()


async def test_binary_secrets_come_as_base64_secret_binary(world: World, api: Served) -> None:
    blob = bytes(range(256))
    await world.put("app/bin", blob, binary=True)
    doc = (await api.get("/secretsmanager/get", secretId="app/bin")).json()
    assert "SecretString" not in doc
    assert base64.b64decode(doc["SecretBinary"]) == blob


async def test_stages_and_versions_select_like_aws(world: World, api: Served) -> None:
    v1 = await world.put("app/db", "one")
    v2 = await world.put("app/db", "two")
    prev = (
        await api.get("/secretsmanager/get", secretId="app/db", versionStage="AWSPREVIOUS")
    ).json()
    assert (prev["SecretString"], prev["VersionId"], prev["VersionStages"]) == (
        "one",
        v1,
        ["AWSPREVIOUS"],
    )
    by_id = (await api.get("/secretsmanager/get", secretId="app/db", versionId=v2)).json()
    assert by_id["SecretString"] == "two"
    both = await api.get(
        "/secretsmanager/get", secretId="app/db", versionId=v2, versionStage="AWSCURRENT"
    )
    assert both.status == 200
    mismatch = await api.get(
        "/secretsmanager/get", secretId="app/db", versionId=v1, versionStage="AWSCURRENT"
    )
    assert mismatch.status == 400
    assert mismatch.json() == {
        "__type": "InvalidRequestException",
        "message": "You provided a VersionStage that is not associated to the provided VersionId.",
    }


@pytest.mark.parametrize(
    ("query", "status", "doc"),
    [
        (
            "secretId=app/missing",
            400,
            {
                "__type": "ResourceNotFoundException",
                "message": "Secrets Manager can't find the specified secret.",
            },
        ),
        (
            "secretId=app/db&versionStage=AWSPENDING",
            400,
            {
                "__type": "ResourceNotFoundException",
                "message": f"{NO_VALUE} for staging label: AWSPENDING",
            },
        ),
        (
            "secretId=app/db&versionId=nope",
            400,
            {
                "__type": "ResourceNotFoundException",
                "message": f"{NO_VALUE} for VersionId: nope",
            },
        ),
        (
            "secretId=app/db&abc=123",
            400,
            {"__type": "InvalidParameterException", "message": "unknown parameter: abc"},
        ),
        (
            "versionStage=AWSCURRENT",
            400,
            {"__type": "InvalidParameterException", "message": "missing parameter secretId"},
        ),
        (
            "secretId=",
            400,
            {"__type": "InvalidParameterException", "message": "missing parameter secretId"},
        ),
        (
            "secretId=app/db&refreshNow=maybe",
            400,
            {"__type": "InvalidParameterException", "message": "invalid refreshNow value"},
        ),
        (
            "secretId=app/db&secretId=other",
            400,
            {
                "__type": "InvalidParameterException",
                "message": "parameter given more than once: secretId",
            },
        ),
        (
            "secretId=other/db",
            403,
            {"__type": "AccessDeniedException", "message": "access to secret 'other/db' is denied"},
        ),
    ],
)
async def test_errors_have_the_aws_agent_statuses_and_bodies(
    world: World, api: Served, query: str, status: int, doc: dict[str, str]
) -> None:
    await world.put("app/db", "v")
    answer = await api.request(f"/secretsmanager/get?{query}", encoded=True)
    assert (answer.status, answer.json()) == (status, doc)
    assert answer.headers["Content-Type"].startswith("application/json")


async def test_names_and_messages_are_escaped_in_error_bodies(api: Served) -> None:
    weird = 'we"ird\\key\n</script>\u2028\x00'
    answer = await api.request("/secretsmanager/get", params={"secretId": "app/db", weird: "1"})
    assert answer.status == 400
    assert answer.json() == {
        "__type": "InvalidParameterException",
        "message": f"unknown parameter: {weird}",
    }


async def test_the_path_style_reads_names_with_slashes_and_refuses_an_empty_id(
    world: World, api: Served
) -> None:
    await world.put("app/db", "v")
    answer = await api.get("/v1/app/db", versionStage="AWSCURRENT")
    assert answer.json()["SecretString"] == "v"
    empty = await api.get("/v1/")
    assert (empty.status, empty.json()) == (
        400,
        {"__type": "InvalidParameterException", "message": "missing secret ID"},
    )
    extra = await api.get("/v1/app/db", secretId="app/db")
    assert extra.json() == {
        "__type": "InvalidParameterException",
        "message": "unknown parameter: secretId",
    }


async def test_native_routes_take_precedence_over_the_path_style(world: World, api: Served) -> None:
    await world.put("status", "named-status")
    await world.put("secrets/x", "named-secrets-x")
    assert "ready" in (await api.get("/v1/status")).json()
    assert (await api.get("/v1/secrets/x")).status == 403  # the native read of the name "x"
    query = await api.get("/secretsmanager/get", secretId="status")
    assert query.json()["SecretString"] == "named-status"
    assert (await api.get("/secretsmanager/get", secretId="secrets/x")).json()[
        "Name"
    ] == "secrets/x"


async def test_an_arn_works_as_secret_id(world: World, api: Served) -> None:
    await world.put("app/db", "v")
    arn = (await api.get("/secretsmanager/get", secretId="app/db")).json()["ARN"]
    assert (await api.get("/secretsmanager/get", secretId=arn)).json()["Name"] == "app/db"
    assert (await api.get(f"/v1/{arn}")).json()["Name"] == "app/db"


async def test_refresh_now_sees_a_rotation_the_cache_has_not(world: World, api: Served) -> None:
    await world.put("app/db", "one")
    await world.writer.put("app/db", b"two")  # the store moved; the cache has not refreshed
    assert (await api.get("/secretsmanager/get", secretId="app/db")).json()["SecretString"] == "one"
    fresh = await api.get("/secretsmanager/get", secretId="app/db", refreshNow="TRUE")
    assert fresh.json()["SecretString"] == "two"


async def test_aws_reads_are_audited_like_native_ones(world: World, api: Served) -> None:
    version = await world.put("app/db", "v")
    await api.get("/secretsmanager/get", secretId="app/db", versionStage="AWSCURRENT")
    await api.get("/secretsmanager/get", secretId="app/gone")
    read, missing = world.records()
    assert (read["event"], read["version"], read["stage"]) == ("read", version, "CURRENT")
    assert (missing["event"], missing["reason"]) == ("not_found", "secret_not_found")
