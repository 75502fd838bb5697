"""Fault scenarios on the daemon side: each one survived with no lost or corrupted version.

* store servers killed (SIGKILL) and restarted: etcd, moto_server (S3);
* a key provider failing;
* the render directory full (a 64 KiB tmpfs);
* clock jumps, forwards and backwards (a fake clock);
* an unexpected exception inside a part of a running agent.

After each, :func:`check_store` decrypts every version the store holds and
checks each one against the values that were written: 0 lost, 0 corrupted.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.config import AgentConfig, DataKeysConfig
from agent.core import Core
from agent.crypto.datakeys import DataKeys
from agent.errors import KeyUnavailable, StaleTooLong
from agent.metrics import Metrics
from agent.writer import SecretWriter
from tests.agentenv import AgentEnv, RunningAgent
from tests.reliability.conftest import TALLY
from tests.servers import EtcdServer, MotoServer
from tests.test_refresh import World

pytestmark = pytest.mark.timeout(120)
FAST_REFRESH = {
    "interval": "500ms",
    "watch_interval": "5s",
    "backoff_initial": "100ms",
    "backoff_max": "500ms",
}


async def until(predicate: Callable[[], bool], timeout: float = 30.0) -> None:
    """Wait (a liveness bound, never a timing assertion) until ``predicate()``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        assert loop.time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.02)


async def check_store(config: AgentConfig, written: dict[str, set[bytes]]) -> int:
    """Decrypt every version in the store; each must be a value that was written.

    Returns the number of versions checked. Fails on a lost name, a version
    that does not decrypt (corrupted) or a value nobody wrote.
    """
    core = Core.build(config)
    checked = 0
    try:
        names = set(await core.store.list_names())
        assert set(written) <= names, f"lost secrets: {set(written) - names}"
        for name in written:
            state = await core.store.read_stages(name)
            assert state.stages.get("CURRENT"), f"{name}: no CURRENT"
            for vid, _created in await core.store.list_versions(name):
                secret = await core.resolver.fetch(name, vid)
                assert secret.value.reveal() in written[name], f"{name}/{vid}: unknown value"
                checked += 1
            current = await core.resolver.fetch(name, state.stages["CURRENT"])
            assert current.value.reveal() in written[name]
    finally:
        await core.aclose()
    return checked


def survived(scenario: str, versions: int = 0) -> None:
    TALLY["fault_scenarios_survived"] += 1
    TALLY[f"scenario:{scenario}"] += 1
    TALLY["versions_checked"] += versions


def _restarts(agent: RunningAgent) -> int:
    return sum(p["restarts"] for p in agent.daemon.supervisor.status()["parts"])


# ----------------------------------------------------------------- store servers


async def _ride_out_kill(
    env: AgentEnv,
    agent: RunningAgent,
    name: str,
    *,
    kill: Callable[[], None],
    restart: Callable[[], None],
    reseed: Callable[[], None] = lambda: None,
    caplog: pytest.LogCaptureFixture,
) -> None:
    assert await agent.value(name) == b"v1"
    await asyncio.to_thread(kill)
    await until(lambda: all(e["stale"] for e in agent.daemon.cache.status()))
    for _ in range(20):  # reads keep answering with the last good value
        assert await agent.value(name) == b"v1"
        await asyncio.sleep(0.05)
    await asyncio.to_thread(restart)
    await asyncio.to_thread(reseed)
    await asyncio.to_thread(env.put, name, "v2")
    await agent.eventually(name, b"v2", timeout=30)
    await until(lambda: agent.daemon.refresher.store_down_since is None)
    starts = [r for r in caplog.records if r.getMessage().startswith("store unavailable")]
    ends = [r for r in caplog.records if "store available again" in r.getMessage()]
    assert len([r for r in starts if r.levelno == logging.WARNING]) == 1
    assert len(ends) == 1


@pytest.mark.integration
async def test_etcd_killed_and_restarted(
    env: AgentEnv, etcd_server: EtcdServer, caplog: pytest.LogCaptureFixture
) -> None:
    env.configure(
        store={
            "type": "etcd",
            "endpoints": [etcd_server.endpoint],
            "prefix": f"/rel-{uuid.uuid4().hex[:8]}",
            "timeout": "1s",
        },
        refresh=FAST_REFRESH,
    )
    name = "app/db"
    env.put(name, "v1")
    caplog.set_level(logging.INFO, logger="agent.refresh")

    def kill() -> None:
        os.kill(etcd_server.pid, signal.SIGKILL)
        etcd_server.stop()  # reaps it

    async with env.running() as agent:
        await _ride_out_kill(env, agent, name, kill=kill, restart=etcd_server.start, caplog=caplog)
        assert _restarts(agent) == 0
    survived("etcd killed and restarted", await check_store(env.config(), {name: {b"v1", b"v2"}}))


@pytest.fixture
def own_moto(aws_env: dict[str, str]) -> Iterator[MotoServer]:
    """A moto_server of this test's own, so killing it disturbs no other test."""
    import shutil
    import sys

    candidate = Path(sys.executable).parent / "moto_server"
    binary = str(candidate) if candidate.exists() else shutil.which("moto_server")
    if binary is None:
        pytest.skip("moto_server is not installed")
    log_dir = Path(tempfile.mkdtemp(prefix="sa-moto-"))
    server = MotoServer(binary=binary, log_path=log_dir / "moto.log")
    server.launch()
    try:
        yield server
    finally:
        server.stop()


@pytest.mark.integration
async def test_moto_killed_and_restarted(
    env: AgentEnv, own_moto: MotoServer, caplog: pytest.LogCaptureFixture
) -> None:
    import boto3

    bucket = f"rel-{uuid.uuid4().hex[:8]}"

    def make_bucket() -> None:
        s3: Any = boto3.client("s3", region_name="us-east-1", endpoint_url=own_moto.endpoint_url)
        s3.create_bucket(Bucket=bucket)

    make_bucket()
    env.configure(
        store={
            "type": "s3",
            "bucket": bucket,
            "region": "us-east-1",
            "endpoint_url": own_moto.endpoint_url,
            "timeout": "1s",
        },
        refresh={**FAST_REFRESH, "delete_grace": "1h"},
    )
    name = "app/db"
    env.put(name, "v1")
    caplog.set_level(logging.INFO, logger="agent.refresh")

    def kill() -> None:
        os.kill(own_moto.pid, signal.SIGKILL)
        own_moto.stop()

    async with env.running() as agent:
        # moto keeps its state in memory: after the restart the bucket is re-made
        # (as a restored backup would be) and the rotation lands on it.
        await _ride_out_kill(
            env,
            agent,
            name,
            kill=kill,
            restart=own_moto.start,
            reseed=make_bucket,
            caplog=caplog,
        )
    survived("moto_server killed and restarted", await check_store(env.config(), {name: {b"v2"}}))


# ------------------------------------------------------------------ key provider


async def test_a_failing_key_provider_serves_stale_then_the_new_version() -> None:
    w = World(backoff_initial=0.01, backoff_max=0.05)
    await w.writer.put("db", b"v1")
    await w.refresher.load_all()
    # v2 is wrapped under a fresh data key, so the agent must call the provider.
    keys = DataKeys(
        {"local": w.provider}, write_keys=["local"], settings=DataKeysConfig(), metrics=Metrics()
    )
    fresh = SecretWriter(w.store.twin(), keys)
    await fresh.put("db", b"v2")
    w.provider.error = KeyUnavailable("provider down (test)")
    for _ in range(5):
        await w.refresher.resync(trigger="poll")
        lookup = await w.cache.get("db")
        assert lookup.stale and lookup.secret.value.reveal() == b"v1"
    w.provider.error = None
    await w.refresher.resync(trigger="poll")
    lookup = await w.cache.get("db")
    assert not lookup.stale and lookup.secret.value.reveal() == b"v2"
    survived("key provider failing", 2)


# ------------------------------------------------------------------- clock jumps


async def test_clock_jumps_forwards_and_backwards() -> None:
    w = World(max_stale="1h")
    await w.writer.put("db", b"v1")
    await w.refresher.load_all()
    w.clock.now += 30 * 86400  # NTP step forwards a month: nothing is stale
    await w.refresher.resync(trigger="poll")
    assert not (await w.cache.get("db")).stale
    w.clock.now -= 60 * 86400  # and back two months: ages never go negative
    lookup = await w.cache.get("db")
    assert lookup.age >= 0 and not lookup.stale
    await w.refresher.resync(trigger="poll")
    # A jump during an outage: past max_stale the value is withheld (503)...
    w.store.unavailable = True
    await w.refresher.resync(trigger="poll")
    assert (await w.cache.get("db")).stale
    w.clock.now += 2 * 3600
    with pytest.raises(StaleTooLong):
        await w.cache.get("db")
    # ...and served again as soon as the store answers.
    w.store.unavailable = False
    await w.writer.put("db", b"v2")
    await w.refresher.resync(trigger="poll")
    assert (await w.cache.get("db")).secret.value.reveal() == b"v2"
    survived("clock jumps forwards and backwards", 2)


# ------------------------------------------------------------- a crashing part


async def test_a_crash_inside_a_part_restarts_that_part_and_the_agent_keeps_serving(
    env: AgentEnv, caplog: pytest.LogCaptureFixture
) -> None:
    """Before supervision an unexpected exception in the refresher ended the agent."""
    env.put("db", "v1")
    env.configure(refresh=FAST_REFRESH)
    async with env.running() as agent:
        store = agent.daemon.refresher.store
        real = store.list_names
        crashes = 0

        async def broken() -> list[str]:
            nonlocal crashes
            if crashes < 3:
                crashes += 1
                raise RuntimeError("a bug (test)")
            return await real()

        store.list_names = broken  # type: ignore[method-assign]
        agent.daemon.refresher.poke()
        await until(lambda: crashes >= 3)
        assert await agent.value("db") == b"v1"
        await asyncio.to_thread(env.put, "db", "v2")
        await agent.eventually("db", b"v2", timeout=30)
        status = {p["part"]: p for p in agent.daemon.supervisor.status()["parts"]}
        assert status["refresher"]["restarts"] >= 1
        assert status["refresher"]["last_error"] == "RuntimeError"
        code, _, body = await agent.get("/v1/status")
        assert code == 200 and b'"refresher"' in body
    survived("a part crashing (refresher)", await check_store(env.config(), {"db": {b"v1", b"v2"}}))


# ------------------------------------------------------------ render dir full


@pytest.fixture
def tiny_tmpfs() -> Iterator[Path]:
    """A 64 KiB tmpfs (needs root)."""
    directory = Path(tempfile.mkdtemp(prefix="sa-full-", dir="/tmp"))
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64k,mode=0755", "tmpfs", str(directory)],
        capture_output=True,
        check=False,
    )
    if done.returncode != 0:
        directory.rmdir()
        pytest.skip("cannot mount a tmpfs (needs root)")
    try:
        yield directory
    finally:
        subprocess.run(["umount", "-l", str(directory)], check=False)
        directory.rmdir()


@pytest.mark.root
async def test_a_full_render_directory_keeps_the_last_good_file_whole(
    env: AgentEnv, tiny_tmpfs: Path
) -> None:
    dest = tiny_tmpfs / "big.txt"
    small, huge, after = "s" * 20_000, "h" * 100_000, "a" * 10_000
    env.put("big", small)
    env.configure(templates=[{"destination": str(dest), "secret": "big"}])
    async with env.running() as agent:
        await until(lambda: dest.exists() and dest.read_text() == small)
        await asyncio.to_thread(env.put, "big", huge)
        await agent.eventually("big", huge.encode())
        await until(lambda: agent.daemon.renderer.status()["templates"][0]["error"] is not None)
        assert dest.read_text() == small  # whole: never torn, never empty
        assert sorted(p.name for p in tiny_tmpfs.iterdir()) == ["big.txt"]  # no temp left
        code, _, _ = await agent.get("/healthz")
        assert code == 200
        await asyncio.to_thread(env.put, "big", after)
        await until(lambda: dest.read_text() == after, timeout=90)
    survived(
        "render directory full",
        await check_store(env.config(), {"big": {small.encode(), huge.encode(), after.encode()}}),
    )
