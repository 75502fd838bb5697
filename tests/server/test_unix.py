"""The Unix-socket listener: peer identity, access decisions, audit records, request checks."""

from __future__ import annotations

import asyncio
import os
from typing import Any

import pytest

from agent.audit import AuditUnavailable, NullAudit
from tests.server.conftest import ServeUnix, World


def _me() -> dict[str, Any]:
    return {
        "listener": "unix",
        "uid": os.getuid(),
        "gid": os.getgid(),
        "pid": os.getpid(),
        "exe": os.readlink(f"/proc/{os.getpid()}/exe"),
    }


async def test_an_allowed_read_is_served_counted_and_audited(
    world: World, serve_unix: ServeUnix
) -> None:
    version = await world.put("app/db", "s3cret-value")
    api = await serve_unix()
    answer = await api.get("/v1/secrets/app/db")
    assert answer.status == 200
    assert answer.json()["value"] == "s3cret-value"
    (record,) = world.records()
    assert record["event"] == "read" and record["outcome"] == "allowed"
    assert record["caller"] == _me()
    assert record["secret"] == "app/db"
    assert record["version"] == version
    assert record["stage"] == "CURRENT"
    assert record["reason"] == "access[0]"
    assert "s3cret-value" not in world.audit_path.read_text()
    assert world.decisions("unix", "allow") == 1


async def test_denied_and_missing_secrets_answer_alike_but_audit_the_truth(
    world: World, serve_unix: ServeUnix
) -> None:
    await world.put("other/exists", "v")
    api = await serve_unix()
    exists = await api.get("/v1/secrets/other/exists")
    missing = await api.get("/v1/secrets/other/missing")
    assert exists.status == missing.status == 403
    assert exists.json()["error"]["code"] == missing.json()["error"]["code"] == "access_denied"
    assert exists.body.replace(b"exists", b"NAME") == missing.body.replace(b"missing", b"NAME")
    held, not_held = world.records()
    assert held["event"] == not_held["event"] == "denied"
    assert held["reason"].endswith("(secret held by the agent)")
    assert not_held["reason"].endswith("(secret not held by the agent)")
    assert held["caller"]["uid"] == os.getuid()
    assert world.decisions("unix", "deny") == 2


async def test_a_missing_secret_to_an_allowed_caller_is_404_and_audited_not_found(
    world: World, serve_unix: ServeUnix
) -> None:
    api = await serve_unix()
    answer = await api.get("/v1/secrets/app/nope")
    assert answer.status == 404
    assert answer.json()["error"]["code"] == "secret_not_found"
    (record,) = world.records()
    assert (record["event"], record["outcome"], record["reason"]) == (
        "not_found",
        "not_found",
        "secret_not_found",
    )


async def test_stages_outside_the_rule_are_denied_after_the_lookup(
    world: World, serve_unix: ServeUnix
) -> None:
    world.set_rules([{"secrets": ["app/*"], "uids": [os.getuid()], "stages": ["CURRENT"]}])
    await world.put("app/db", "old")
    await world.put("app/db", "new")
    api = await serve_unix()
    assert (await api.get("/v1/secrets/app/db", stage="AWSPREVIOUS")).status == 403
    assert (await api.get("/v1/secrets/app/db", stage="PENDING")).status == 404
    denied, missing = world.records()
    assert denied["event"] == "denied" and denied["stage"] == "PREVIOUS"
    assert missing["event"] == "not_found" and missing["reason"] == "version_not_found"


async def test_a_version_read_needs_one_of_its_stages_allowed(
    world: World, serve_unix: ServeUnix
) -> None:
    v1 = await world.put("app/db", "one")
    v2 = await world.put("app/db", "two")
    await world.put("app/db", "three")  # v1 now carries no stage, v2 is PREVIOUS
    api = await serve_unix()
    assert (await api.get("/v1/secrets/app/db", version=v2)).json()["value"] == "two"
    assert (await api.get("/v1/secrets/app/db", version=v1)).status == 403
    world.set_rules([{"secrets": ["app/*"], "uids": [os.getuid()], "stages": ["*"]}])
    assert (await api.get("/v1/secrets/app/db", version=v1)).json()["value"] == "one"


async def test_a_version_that_does_not_carry_the_stage_is_a_bad_request(
    world: World, serve_unix: ServeUnix
) -> None:
    v1 = await world.put("app/db", "one")
    await world.put("app/db", "two")
    api = await serve_unix()
    answer = await api.get("/v1/secrets/app/db", version=v1, stage="CURRENT")
    assert answer.status == 400
    assert answer.json()["error"]["code"] == "stage_mismatch"
    assert world.records()[-1]["reason"] == "stage_mismatch"


async def test_listing_and_status_show_only_what_the_caller_may_read(
    world: World, serve_unix: ServeUnix
) -> None:
    await world.put("app/a", "1")
    await world.put("other/b", "2")
    api = await serve_unix()
    listed = (await api.get("/v1/secrets")).json()["secrets"]
    assert [s["name"] for s in listed] == ["app/a"]
    status = (await api.get("/v1/status")).json()
    assert [s["name"] for s in status["secrets"]] == ["app/a"]
    assert status["audit"] == {
        "enabled": True,
        "path": "…/audit.log",  # no absolute path to callers
        "records": 0,
        "failing": False,
        "dropped": 0,
        "aggregated": 0,
        "coalesced": 0,
    }


async def test_a_read_that_cannot_be_audited_is_refused_with_503(
    world: World, serve_unix: ServeUnix
) -> None:
    class FailingAudit(NullAudit):
        def record(self, event: str, *, required: bool = False, **fields: Any) -> None:
            if required:
                raise AuditUnavailable("the audit log cannot be written (test)")

    await world.put("app/db", "never-served")
    world.state.audit = FailingAudit()
    api = await serve_unix()
    answer = await api.get("/v1/secrets/app/db", format="raw")
    assert answer.status == 503
    assert answer.json()["error"]["code"] == "audit_unavailable"
    assert b"never-served" not in answer.body
    assert answer.headers["Retry-After"] == "1"


@pytest.mark.parametrize("header", ["X-Forwarded-For", "Forwarded"])
async def test_forwarded_requests_are_refused_and_audited(
    world: World, serve_unix: ServeUnix, header: str
) -> None:
    await world.put("app/db", "v")
    api = await serve_unix()
    answer = await api.request("/v1/secrets/app/db", headers={header: "203.0.113.9"})
    assert answer.status == 400
    assert answer.json()["error"]["code"] == "forwarded"
    (record,) = world.records()
    assert record["event"] == "denied" and record["outcome"] == "refused"
    assert record["caller"] == _me()
    assert "203.0.113.9" not in world.audit_path.read_text()


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "PATCH", "OPTIONS"])
@pytest.mark.parametrize(
    ("path", "shape"),
    [
        ("/v1/secrets/app/db", "error"),
        ("/v1/status", "error"),
        ("/nope", "error"),
        ("/secretsmanager/get?secretId=app/db", "__type"),
        ("/v1/app/db", "__type"),
        ("/ping", "__type"),
    ],
)
async def test_methods_other_than_get_and_head_are_405_in_the_route_family_shape(
    world: World, serve_unix: ServeUnix, method: str, path: str, shape: str
) -> None:
    api = await serve_unix()
    answer = await api.request(path, method=method, encoded=True)
    assert answer.status == 405
    assert answer.headers["Allow"] == "GET, HEAD"
    assert shape in answer.json()
    assert world.records() == []


async def test_head_answers_like_get_without_a_body(world: World, serve_unix: ServeUnix) -> None:
    await world.put("app/db", "value")
    api = await serve_unix()
    answer = await api.request("/v1/secrets/app/db", method="HEAD")
    assert answer.status == 200 and answer.body == b""
    assert world.records()[0]["event"] == "read"


async def test_requests_beyond_the_limit_get_429_but_health_checks_still_answer(
    world: World, serve_unix: ServeUnix
) -> None:
    await world.writer.put("app/slow", b"v")  # in the store, not yet in the cache
    world.provider.gate = asyncio.Event()
    api = await serve_unix(max_connections=1)
    first = asyncio.create_task(api.get("/v1/secrets/app/slow"))
    await asyncio.wait_for(world.provider.entered.wait(), 5)
    busy = await api.get("/v1/secrets/app/slow")
    assert busy.status == 429
    assert busy.json()["error"]["code"] == "too_many_requests"
    assert (await api.get("/healthz")).status == 200
    world.provider.gate.set()
    assert (await first).status == 200


async def test_the_aws_prefix_is_configurable_and_native_routes_win(
    world: World, serve_unix: ServeUnix
) -> None:
    await world.put("app/db", "v")
    api = await serve_unix(aws_path_prefix="aws")
    answer = await api.get("/aws/app/db")
    assert answer.status == 200 and answer.json()["SecretString"] == "v"
    assert (await api.get("/v1/status")).status == 200
    assert (await api.get("/v1/app/db")).status == 404  # not a route with this prefix
