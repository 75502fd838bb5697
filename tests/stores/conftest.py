"""``store_factory``: the store contract suite runs once per store kind.

Each kind is one entry in :data:`STORE_KINDS`: an async context manager that
builds a store over a namespace and closes it afterwards. Kinds backed by a
real server (etcd, moto_server for aws-secretsmanager and s3) fetch their
server fixture lazily with ``request.getfixturevalue`` inside the builder, so
running only the file and memory kinds never needs those fixtures. To add one::

    @contextlib.asynccontextmanager
    async def _etcd_store(request, namespace, scratch):
        server = request.getfixturevalue("etcd_server")
        store = EtcdStore(endpoints=[server.endpoint], prefix=f"/t/{namespace}")
        try:
            yield store
        finally:
            await store.aclose()

    STORE_KINDS["etcd"] = StoreKind(_etcd_store, marks=(pytest.mark.integration,))
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import pytest

from agent.stores.base import WritableStore
from agent.stores.file import FileStore
from tests.fakes import MemoryStore

Builder = Callable[
    [pytest.FixtureRequest, str, dict[str, Any]],
    contextlib.AbstractAsyncContextManager[WritableStore],
]


@dataclass(frozen=True)
class StoreKind:
    """How to build one kind of store for the contract suite."""

    build: Builder
    marks: tuple[pytest.MarkDecorator, ...] = ()


@contextlib.asynccontextmanager
async def _file_store(
    request: pytest.FixtureRequest, namespace: str, scratch: dict[str, Any]
) -> AsyncIterator[WritableStore]:
    tmp_path: Path = request.getfixturevalue("tmp_path")
    root = tmp_path / "stores" / namespace
    root.mkdir(parents=True, exist_ok=True)
    store = FileStore(root, store_id="test")
    try:
        yield store
    finally:
        await store.aclose()


@contextlib.asynccontextmanager
async def _memory_store(
    request: pytest.FixtureRequest, namespace: str, scratch: dict[str, Any]
) -> AsyncIterator[WritableStore]:
    first: MemoryStore | None = scratch.get(namespace)
    store = MemoryStore("test") if first is None else first.twin()
    scratch.setdefault(namespace, store)
    try:
        yield store
    finally:
        await store.aclose()


@contextlib.asynccontextmanager
async def _etcd_store(
    request: pytest.FixtureRequest, namespace: str, scratch: dict[str, Any]
) -> AsyncIterator[WritableStore]:
    from agent.stores.etcd import EtcdStore

    server = request.getfixturevalue("etcd_server")
    store = EtcdStore(server.endpoint, prefix=f"/t/{namespace}", store_id="test")
    try:
        yield store
    finally:
        await store.aclose()


@contextlib.asynccontextmanager
async def _s3_store(
    request: pytest.FixtureRequest, namespace: str, scratch: dict[str, Any]
) -> AsyncIterator[WritableStore]:
    from agent.stores.s3 import S3Store

    server = request.getfixturevalue("moto_server")
    bucket = "contract-" + namespace.lower().replace("_", "-")[:40]
    if bucket not in scratch:
        import boto3

        boto3.client("s3", region_name="us-east-1", endpoint_url=server.endpoint_url).create_bucket(
            Bucket=bucket
        )
        scratch[bucket] = True
    store = S3Store(
        bucket, prefix="t", store_id="test", region="us-east-1", endpoint_url=server.endpoint_url
    )
    try:
        yield store
    finally:
        await store.aclose()


@contextlib.asynccontextmanager
async def _sm_store(
    request: pytest.FixtureRequest, namespace: str, scratch: dict[str, Any]
) -> AsyncIterator[WritableStore]:
    from agent.stores.aws_sm import SecretsManagerStore

    server = request.getfixturevalue("moto_server")
    store = SecretsManagerStore(
        store_id="test",
        region="us-east-1",
        endpoint_url=server.endpoint_url,
        name_prefix=f"{namespace}/",
    )
    try:
        yield store
    finally:
        await store.aclose()


#: Every store kind the contract suite runs against, by name.
STORE_KINDS: dict[str, StoreKind] = {
    "file": StoreKind(_file_store),
    "memory": StoreKind(_memory_store),
    "etcd": StoreKind(_etcd_store, marks=(pytest.mark.integration,)),
    "s3": StoreKind(_s3_store, marks=(pytest.mark.integration,)),
    "aws-secretsmanager": StoreKind(_sm_store, marks=(pytest.mark.integration,)),
}


class StoreFactory(Protocol):
    async def __call__(self, *, namespace: str | None = None) -> WritableStore: ...


@pytest.fixture(
    params=[pytest.param(name, marks=kind.marks, id=name) for name, kind in STORE_KINDS.items()]
)
async def store_factory(request: pytest.FixtureRequest) -> AsyncIterator[StoreFactory]:
    """Return ``make``: ``await make()`` is a fresh, empty store in its own namespace.

    ``await make(namespace="x")`` twice gives two clients of the same data (as
    two agents on one store would be). Every store is closed after the test.
    """
    kind = STORE_KINDS[request.param]
    test_token = uuid.uuid4().hex[:10]
    scratch: dict[str, Any] = {}
    async with contextlib.AsyncExitStack() as stack:

        async def make(*, namespace: str | None = None) -> WritableStore:
            ns = f"{test_token}-{namespace or uuid.uuid4().hex[:10]}"
            return await stack.enter_async_context(kind.build(request, ns, scratch))

        yield make
