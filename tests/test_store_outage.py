"""A store outage while agents serve: cached reads never fail, and recovery is prompt.

Each test builds an agent's read side as the daemon does (``Core.build``,
``SecretCache``, ``Refresher``), serves a secret, takes the store away for
``SA_OUTAGE_SECONDS`` (3 s by default; 30 s for the long manual run) and at
least until it has noticed, reads all the while, brings the store back,
rotates the secret right away through the writer code path, and waits for the
agent to serve the new value.

etcd is killed outright (a server crash). moto keeps its state only in
memory, so AWS outages are made with a TCP proxy that is cut and restored:
an outage of the network path, as AWS clients see one.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import boto3
import pytest

from agent.cache import SecretCache
from agent.config import AgentConfig
from agent.core import Core
from agent.errors import BackendUnavailable
from agent.refresh import Refresher
from tests.agentenv import AgentEnv
from tests.servers import EtcdServer, MotoServer, free_port

pytestmark = pytest.mark.integration

OUTAGE = float(os.environ.get("SA_OUTAGE_SECONDS", "3"))
REFRESH = {
    "interval": "1s",
    "watch_interval": "5s",
    "backoff_initial": "200ms",
    "backoff_max": "1s",
    "jitter": 0.1,
}
BACKOFF_PERIOD = 1.0 * 1.1  # backoff_max with jitter: the longest wait between attempts
MARGIN = 3.0  # seconds of slack for a loaded CI machine (a liveness bound)


@dataclass
class OutageReport:
    reads: int = 0
    failures: list[str] = field(default_factory=list)
    stale: int = 0
    pickup: float = 0.0


@contextlib.asynccontextmanager
async def _agent(config: AgentConfig, name: str) -> AsyncIterator[SecretCache]:
    """An agent's cache kept fresh by its refresher, on its own store connection."""
    core = Core.build(config)
    cache = SecretCache(core.resolver, settings=config.refresh, metrics=core.metrics)
    refresher = Refresher(
        cache, core.store, settings=config.refresh, patterns=[name], metrics=core.metrics
    )
    await refresher.load_all()
    task = asyncio.create_task(refresher.run())
    try:
        yield cache
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await cache.aclose()
        await core.aclose()


async def _value(cache: SecretCache, name: str) -> bytes:
    return (await cache.get(name)).secret.value.reveal()


async def _put_when_back(config: AgentConfig, name: str, value: bytes) -> None:
    """Rotate through the writer code path, retrying while the store is still coming back."""
    core = Core.build(config)
    try:
        async with asyncio.timeout(60):
            while True:
                try:
                    await core.writer().put(name, value)
                    return
                except BackendUnavailable:
                    await asyncio.sleep(0.1)
    finally:
        await core.aclose()


async def _ride_out(
    config: AgentConfig,
    *,
    cut: Callable[[], Awaitable[None]],
    restore: Callable[[], Awaitable[None]],
) -> OutageReport:
    """Serve, cut the store for OUTAGE seconds while reading, restore, rotate, time the pickup."""
    name = f"outage/{uuid.uuid4().hex[:8]}"
    await _put_when_back(config, name, b"before")
    report = OutageReport()
    async with _agent(config, name) as cache:
        assert await _value(cache, name) == b"before"
        await cut()
        try:
            # At least OUTAGE seconds, and until the agent has noticed (bounded).
            started = time.monotonic()
            while (elapsed := time.monotonic() - started) < OUTAGE or not report.stale:
                assert elapsed < 30, "the agent never noticed the outage"
                report.reads += 1
                try:
                    lookup = await cache.get(name)
                except Exception as exc:
                    report.failures.append(repr(exc))
                else:
                    report.stale += lookup.stale
                    if lookup.secret.value.reveal() != b"before":
                        report.failures.append("wrong value")
                await asyncio.sleep(0.05)
        finally:
            await restore()
        await _put_when_back(config, name, b"after")
        rotated = time.monotonic()
        async with asyncio.timeout(30):
            while await _value(cache, name) != b"after":
                await asyncio.sleep(0.005)
        report.pickup = time.monotonic() - rotated
        assert not (await cache.get(name)).stale
    print(
        f"\n{config.store.type}: {OUTAGE:.0f} s outage, {report.reads} reads, "
        f"{len(report.failures)} failed, {report.stale} stale; "
        f"rotation served {report.pickup * 1000:.0f} ms after it was written"
    )
    return report


def _check(report: OutageReport) -> None:
    assert report.failures == []
    assert report.stale > 0
    assert report.pickup < BACKOFF_PERIOD + MARGIN


async def test_an_etcd_outage_serves_stale_and_the_next_rotation_arrives_within_a_backoff(
    env: AgentEnv, etcd_server: EtcdServer
) -> None:
    env.configure(
        store={
            "type": "etcd",
            "endpoints": [etcd_server.endpoint],
            "prefix": f"/outage-{uuid.uuid4().hex[:8]}",
            "timeout": "1s",
        },
        refresh=REFRESH,
    )

    async def cut() -> None:
        await asyncio.to_thread(etcd_server.stop)

    async def restore() -> None:
        await asyncio.to_thread(etcd_server.start)

    _check(await _ride_out(env.config(), cut=cut, restore=restore))


# --------------------------------------------------------------------------- AWS, via a proxy


class _Proxy:
    """A loopback TCP proxy to one port; ``cut`` resets every connection and refuses new ones."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = free_port()
        self._server: asyncio.Server | None = None
        self._transports: set[asyncio.WriteTransport] = set()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)

    async def cut(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        for transport in list(self._transports):
            transport.abort()
        self._transports.clear()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.transport.abort()
            return
        self._transports |= {writer.transport, up_writer.transport}
        await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))
        self._transports -= {writer.transport, up_writer.transport}


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except (OSError, ConnectionError):
        pass
    finally:
        writer.transport.abort()


@contextlib.asynccontextmanager
async def _proxied(moto: MotoServer) -> AsyncIterator[_Proxy]:
    proxy = _Proxy(moto.port)
    await proxy.start()
    try:
        yield proxy
    finally:
        await proxy.cut()


async def test_a_secrets_manager_outage_serves_stale_and_the_next_rotation_arrives_promptly(
    env: AgentEnv, moto_server: MotoServer
) -> None:
    async with _proxied(moto_server) as proxy:
        env.configure(
            store={
                "type": "aws-secretsmanager",
                "region": "us-east-1",
                "endpoint_url": proxy.url,
                "name_prefix": f"outage-{uuid.uuid4().hex[:8]}/",
                "timeout": "1s",
            },
            refresh=REFRESH,
        )
        _check(await _ride_out(env.config(), cut=proxy.cut, restore=proxy.start))


async def test_an_s3_outage_serves_stale_and_the_next_rotation_arrives_promptly(
    env: AgentEnv, moto_server: MotoServer
) -> None:
    bucket = f"outage-{uuid.uuid4().hex[:8]}"
    s3: Any = boto3.client("s3", region_name="us-east-1", endpoint_url=moto_server.endpoint_url)
    s3.create_bucket(Bucket=bucket)
    async with _proxied(moto_server) as proxy:
        env.configure(
            store={
                "type": "s3",
                "bucket": bucket,
                "region": "us-east-1",
                "endpoint_url": proxy.url,
                "timeout": "1s",
            },
            refresh=REFRESH,
        )
        _check(await _ride_out(env.config(), cut=proxy.cut, restore=proxy.start))
