"""Finding 2 and 6: hostile or broken store content never kills the agent, and is heard.

Regression tests: before the fix a ``stages.json`` or envelope of 200,000
nested brackets raised RecursionError (only ValueError was caught, in every
store and in the envelope parser), which ended the agent; a 253 MB envelope
was read whole; a malformed stage map logged nothing.
"""

from __future__ import annotations

import asyncio
import logging
import os
import tracemalloc
from pathlib import Path

import pytest

from agent.config import DataKeysConfig
from agent.crypto import envelope
from agent.crypto.datakeys import DataKeys
from agent.errors import BackendUnavailable, DecryptionError, MalformedStoreData
from agent.metrics import Metrics
from agent.stores.base import WritableStore
from agent.stores.file import FileStore
from agent.writer import SecretWriter
from tests.agentenv import AgentEnv
from tests.fakes import FakeKeyProvider

pytestmark = pytest.mark.timeout(90)

NESTED = b"[" * 200_000 + b"]" * 200_000
NESTED_OBJECT = b'{"a":' * 150_000 + b'"x"' + b"}" * 150_000  # under the 1 MiB cap


def _writer(store: WritableStore) -> SecretWriter:
    keys = DataKeys(
        {"local": FakeKeyProvider("local")},
        write_keys=["local"],
        settings=DataKeysConfig(),
        metrics=Metrics(),
    )
    return SecretWriter(store, keys)


async def _file_store(tmp_path: Path) -> tuple[FileStore, str]:
    store = FileStore(tmp_path / "store", store_id="test")
    (tmp_path / "store").mkdir()
    result = await _writer(store).put("db", b"v1")
    return store, result.version_id


@pytest.mark.parametrize("content", [NESTED, NESTED_OBJECT], ids=["array", "object"])
async def test_a_deeply_nested_stage_map_is_malformed_store_data(
    tmp_path: Path, content: bytes
) -> None:
    store, _ = await _file_store(tmp_path)
    (tmp_path / "store/secrets/db/stages.json").write_bytes(content)
    with pytest.raises(MalformedStoreData, match="nested more than 32 levels") as info:
        await store.read_stages("db")
    assert isinstance(info.value, BackendUnavailable)  # served stale, not dropped
    assert "stage map of secret 'db'" in info.value.message


def test_a_deeply_nested_envelope_is_refused_as_a_decryption_error() -> None:
    for content in (NESTED, NESTED_OBJECT, b"\xff" * 10, b'{"a":1,"a":2}'):
        with pytest.raises(DecryptionError, match="malformed envelope"):
            envelope.parse(content, where="test")


async def test_a_huge_envelope_is_refused_before_it_is_read(tmp_path: Path) -> None:
    store, vid = await _file_store(tmp_path)
    path = tmp_path / f"store/secrets/db/versions/{vid}.json"
    with path.open("r+b") as f:
        f.truncate(253 * 1000 * 1000)  # sparse: costs no disk
    tracemalloc.start()
    try:
        with pytest.raises(DecryptionError, match="max_object_size"):
            await store.read_version("db", vid)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 8 * 1024 * 1024


async def test_an_oversized_stage_map_is_refused_by_the_configured_cap(tmp_path: Path) -> None:
    from agent.bounded import Limits

    store, vid = await _file_store(tmp_path)
    small = FileStore(tmp_path / "store", store_id="test", limits=Limits(max_object_size=64))
    padded = b'{"CURRENT": "%s"}' % vid.encode() + b" " * 100
    (tmp_path / "store/secrets/db/stages.json").write_bytes(padded)
    assert (await store.read_stages("db")).stages["CURRENT"] == vid
    with pytest.raises(MalformedStoreData, match="over the limit of 64 bytes"):
        await small.read_stages("db")


async def _until(predicate: object, timeout: float = 15.0) -> None:
    assert callable(predicate)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        assert loop.time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.02)


async def test_the_agent_keeps_serving_through_hostile_store_objects_and_says_so(
    env: AgentEnv, caplog: pytest.LogCaptureFixture
) -> None:
    env.put("db", "good")
    env.configure(refresh={"interval": "200ms", "backoff_initial": "50ms", "backoff_max": "200ms"})
    stages = env.dir / "store/secrets/db/stages.json"
    caplog.set_level(logging.WARNING)
    async with env.running() as agent:
        good = stages.read_bytes()
        stages.write_bytes(NESTED)
        await _until(lambda: any(e["stale"] for e in agent.daemon.cache.status()))
        assert await agent.value("db") == b"good"  # stale, still served
        await asyncio.sleep(1.0)  # several polls: still one line (rate-limited)
        lines = [
            r.getMessage() for r in caplog.records if "stage map of secret 'db'" in r.getMessage()
        ]
        assert len(lines) == 1, lines
        # A stage naming a version that does not exist (hand-written, so it also
        # carries no proof: either refusal must be logged).
        before = len(caplog.records)
        stages.write_bytes(b'{"CURRENT": "' + b"0" * 32 + b'"}')
        await _until(
            lambda: any(
                "'db'" in r.getMessage() and r.levelno >= logging.WARNING
                for r in caplog.records[before:]
            )
        )
        assert await agent.value("db") == b"good"
        stages.write_bytes(good)
        await _until(lambda: not any(e["stale"] for e in agent.daemon.cache.status()))
        status, _, _ = await agent.get("/healthz")
        assert status == 200
        assert not agent.daemon.supervisor.parts[1].restarts  # the refresher never crashed


@pytest.mark.integration
async def test_etcd_hostile_records_are_domain_errors(etcd_server: object) -> None:
    from agent.stores.etcd import EtcdStore

    endpoint = getattr(etcd_server, "endpoint")  # noqa: B009 - the fixture's type is private
    store = EtcdStore(endpoint, prefix=f"/rel/{os.getpid()}", store_id="test")
    try:
        async with asyncio.timeout(30):  # etcd may just have been restarted by another test
            while True:
                try:
                    vid = (await _writer(store).put("db", b"v1")).version_id
                    break
                except BackendUnavailable:
                    await asyncio.sleep(0.2)
        await store._client.put(store._key("db", "stages"), NESTED)
        with pytest.raises(MalformedStoreData, match="nested"):
            await store.read_stages("db")
        await store._client.put(store._key("db", "versions", vid), NESTED)
        with pytest.raises(DecryptionError, match="nested"):
            await store.read_version("db", vid)
        await store._client.put(store._key("db", "versions", vid), b"x" * (1_400_000 + 1))
        with pytest.raises(DecryptionError, match="over the limit"):
            await store.read_version("db", vid)
    finally:
        await store.aclose()


@pytest.mark.integration
async def test_s3_hostile_objects_are_domain_errors(moto_server: object) -> None:
    import boto3

    from agent.stores.s3 import S3Store

    url = getattr(moto_server, "endpoint_url")  # noqa: B009
    bucket = f"rel-{os.getpid()}"
    s3 = boto3.client("s3", region_name="us-east-1", endpoint_url=url)
    s3.create_bucket(Bucket=bucket)
    store = S3Store(bucket, prefix="t", store_id="test", region="us-east-1", endpoint_url=url)
    try:
        vid = (await _writer(store).put("db", b"v1")).version_id
        s3.put_object(Bucket=bucket, Key="t/db/stages.json", Body=NESTED)
        with pytest.raises(MalformedStoreData, match="nested"):
            await store.read_stages("db")
        s3.put_object(Bucket=bucket, Key=f"t/db/versions/{vid}.json", Body=b" " * (2 << 20))
        with pytest.raises(DecryptionError, match="over the limit"):
            await store.read_version("db", vid)
    finally:
        await store.aclose()
