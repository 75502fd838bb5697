"""The S3 store on moto's standalone server: layout, conditional reads and writes, failures.

The shared contract suite covers the store API; these tests cover what is
S3's own: the object layout, the 304 that makes polling cheap, conditional
writes, creation times, and which failures are transient.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import boto3
import pytest

from agent.errors import BackendUnavailable, BadRequest, Conflict
from agent.metrics import Metrics
from agent.stores.s3 import S3Store
from tests.servers import MotoServer

pytestmark = pytest.mark.integration

REGION = "us-east-1"


def _s3(moto: MotoServer) -> Any:
    return boto3.client("s3", region_name=REGION, endpoint_url=moto.endpoint_url)


@pytest.fixture
def bucket(moto_server: MotoServer) -> str:
    name = f"s3-{uuid.uuid4().hex[:12]}"
    _s3(moto_server).create_bucket(Bucket=name)
    return name


@contextlib.asynccontextmanager
async def _store(moto: MotoServer, bucket: str, **kw: Any) -> AsyncIterator[S3Store]:
    store = S3Store(bucket, region=REGION, endpoint_url=moto.endpoint_url, **kw)
    try:
        yield store
    finally:
        await store.aclose()


async def _statuses(store: S3Store) -> list[int]:
    """HTTP statuses of the store's GetObject calls, recorded from now on."""
    seen: list[int] = []

    def record(http_response: Any, **_: Any) -> None:
        seen.append(http_response.status_code)

    client = await store._aws.get()
    client.meta.events.register("after-call.s3.GetObject", record)
    return seen


async def test_the_layout_is_versions_and_a_stage_map_under_the_prefix(
    moto_server: MotoServer, bucket: str
) -> None:
    async with _store(moto_server, bucket, prefix="team/secrets") as store:
        await store.write_version("app/db", "v1", b"envelope")
        await store.set_stages("app/db", {"CURRENT": "v1"}, expected_revision="")
    s3 = _s3(moto_server)
    keys = sorted(o["Key"] for o in s3.list_objects_v2(Bucket=bucket)["Contents"])
    assert keys == ["team/secrets/app/db/stages.json", "team/secrets/app/db/versions/v1.json"]
    body = s3.get_object(Bucket=bucket, Key="team/secrets/app/db/stages.json")["Body"].read()
    assert body == b'{"CURRENT":"v1"}'


async def test_an_unchanged_stage_map_is_answered_304_without_a_body(
    moto_server: MotoServer, bucket: str
) -> None:
    async with _store(moto_server, bucket) as store, _store(moto_server, bucket) as writer:
        await writer.write_version("db", "v1", b"e1")
        first = await writer.set_stages("db", {"CURRENT": "v1"}, expected_revision="")
        statuses = await _statuses(store)
        for _ in range(3):
            assert await store.read_stages("db") == first
        assert statuses == [200, 304, 304]
        await writer.write_version("db", "v2", b"e2")
        moved = await writer.set_stages(
            "db", {"CURRENT": "v2", "PREVIOUS": "v1"}, expected_revision=first.revision
        )
        assert await store.read_stages("db") == moved  # a changed ETag: 200 and the new map
        assert statuses[-1] == 200
        assert moved.revision != first.revision


async def test_a_stage_move_from_a_stale_etag_conflicts(
    moto_server: MotoServer, bucket: str
) -> None:
    async with _store(moto_server, bucket) as store:
        await store.write_version("db", "v1", b"e1")
        await store.write_version("db", "v2", b"e2")
        first = await store.set_stages("db", {"CURRENT": "v1"}, expected_revision="")
        await store.set_stages("db", {"CURRENT": "v2"}, expected_revision=first.revision)
        with pytest.raises(Conflict, match="changed concurrently"):
            await store.set_stages("db", {"CURRENT": "v1"}, expected_revision=first.revision)
        with pytest.raises(Conflict):  # a first map, but one exists already
            await store.set_stages("db", {"CURRENT": "v1"}, expected_revision="")
        assert (await store.read_stages("db")).stages == {"CURRENT": "v2"}


async def test_created_at_is_exact_and_falls_back_to_last_modified(
    moto_server: MotoServer, bucket: str
) -> None:
    async with _store(moto_server, bucket) as store:
        before = datetime.now(UTC)
        await store.write_version("db", "v1", b"e1")
        after = datetime.now(UTC)
        ours = await store.read_version("db", "v1")
        assert before <= ours.created_at <= after  # LastModified would be whole seconds
        # An object put by other tools has no created-at metadata.
        _s3(moto_server).put_object(
            Bucket=bucket, Key="secrets-agent/db/versions/v2.json", Body=b"x"
        )
        theirs = await store.read_version("db", "v2")
        assert abs(theirs.created_at - datetime.now(UTC)) < timedelta(minutes=5)
        assert {v for v, _ in await store.list_versions("db")} == {"v1", "v2"}


async def test_a_missing_bucket_is_a_permanent_error(moto_server: MotoServer) -> None:
    metrics = Metrics()
    async with _store(moto_server, f"nope-{uuid.uuid4().hex[:8]}", metrics=metrics) as store:
        with pytest.raises(BadRequest, match="NoSuchBucket"):
            await store.read_stages("db")
        with pytest.raises(BadRequest):
            await store.list_names()


async def test_an_unreachable_endpoint_is_unavailable_and_counted() -> None:
    from tests.servers import free_port

    metrics = Metrics()
    store = S3Store(
        "b",
        region=REGION,
        endpoint_url=f"http://127.0.0.1:{free_port()}",
        timeout=0.5,
        metrics=metrics,
    )
    try:
        with pytest.raises(BackendUnavailable):
            await store.read_stages("db")
    finally:
        await store.aclose()
    assert (
        metrics.registry.get_sample_value(
            "secrets_agent_store_operations_total",
            {"operation": "read_stages", "outcome": "unavailable"},
        )
        == 1
    )
