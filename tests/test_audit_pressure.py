"""The audit log under pressure (issue 11 finding 4, issue 13's audit part).

Whole records or none, a chain that survives a full disk, refusals
aggregated, group commit with a writer task, coalesced reads, size rotation
with the chain carried across files, and ``audit verify`` on a directory.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import os
import subprocess
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from agent.audit import AuditLog, AuditUnavailable, verify
from agent.config import AuditConfig
from agent.server.peer import Caller
from tests.agentenv import AgentEnv
from tests.test_audit import CALLER, cli_verify, docs, write

FULL = bool(os.environ.get("RELIABILITY_FULL") or os.environ.get("SA_RELIABILITY_FULL"))
FLOOD = 20_000 if FULL else 5_000
OTHER = Caller("unix", uid=1001, gid=1001, pid=77, groups=frozenset({1001}), exe="/bin/x")


@contextlib.asynccontextmanager
async def writer(log: AuditLog) -> AsyncIterator[asyncio.Task[None]]:
    """Run the log's writer task for the duration of the block."""
    task = asyncio.create_task(log.run())
    await asyncio.sleep(0)
    try:
        yield task
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def test_a_write_cut_short_by_a_full_disk_is_truncated_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "a.log"
    log = AuditLog(path)
    write(log, 2)
    before = path.read_bytes()
    real_write = os.write

    def half_then_full(fd: int, data: Any) -> int:
        if len(data) > 10:
            return real_write(fd, bytes(data[: len(data) // 2]))
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as patch:
        patch.setattr(os, "write", half_then_full)
        with pytest.raises(AuditUnavailable):
            log.record("read", caller=CALLER, secret="a", outcome="allowed", required=True)
    assert path.read_bytes() == before  # no partial `{`
    write(log, 1, start=2)
    asyncio.run(log.aclose())
    assert verify([path]).ok
    assert [d["event"] for d in docs(path)] == ["read", "read", "records_dropped", "read"]


def test_a_torn_tail_left_by_a_crash_is_cut_on_start(tmp_path: Path) -> None:
    path = tmp_path / "a.log"
    log = AuditLog(path)
    write(log, 3)
    asyncio.run(log.aclose())
    with open(path, "ab") as fh:
        fh.write(b'{"seq":4,"time":"2026-')  # a crash in the middle of a write
    assert not verify([path]).ok
    log = AuditLog(path)
    write(log, 1, start=3)
    asyncio.run(log.aclose())
    verdict = verify([path])
    assert verdict.ok and verdict.records == 4


async def test_refusals_are_aggregated_per_caller_and_reason_per_interval(tmp_path: Path) -> None:
    path = tmp_path / "a.log"
    log = AuditLog(path, settings=AuditConfig(path=str(path), aggregate_interval=3600))
    tcp = Caller("tcp")
    for _ in range(20_000):
        log.record("denied", caller=tcp, outcome="refused", reason="bad token")
    for _ in range(5):
        log.record("denied", caller=OTHER, secret="app/x", outcome="denied", reason="no rule")
    write(log, 3)  # allowed reads: one record each
    assert len(docs(path)) == 2 + 3
    await log.aclose()
    records = docs(path)
    counts = {(d["event"], d.get("reason")): d.get("count") for d in records[5:]}
    assert counts == {("denied", "bad token"): 19_999, ("denied", "no rule"): 4}
    assert all("since" in d for d in records[5:])
    assert path.stat().st_size < 4096
    assert verify([path]).ok


async def test_distinct_refusal_keys_beyond_the_table_are_counted_in_one_record(
    tmp_path: Path,
) -> None:
    from agent.audit import MAX_AGGREGATE_KEYS

    path = tmp_path / "a.log"
    log = AuditLog(path, settings=AuditConfig(path=str(path), aggregate_interval=3600))
    for i in range(MAX_AGGREGATE_KEYS + 1000):
        log.record("not_found", caller=CALLER, secret=f"app/{i}", outcome="not_found")
    await log.aclose()
    records = docs(path)
    assert len(records) == MAX_AGGREGATE_KEYS + 1
    assert records[-1]["count"] == 1000 and "secret" not in records[-1]


async def test_with_the_writer_running_a_read_waits_for_its_batch_and_sigterm_loses_nothing(
    tmp_path: Path,
) -> None:
    path = tmp_path / "a.log"
    log = AuditLog(path)
    async with writer(log):
        log.record("read", caller=CALLER, secret="app/a", outcome="allowed", required=True)
        assert not path.read_bytes()  # queued, not written yet
        await log.sync()
        assert len(docs(path)) == 1  # the read would be answered now
        for i in range(1000):  # queued, never awaited
            log.record("rendered", secret=f"t{i}", outcome="written")
    await log.aclose()  # what the daemon does on SIGTERM
    assert len(docs(path)) == 1001
    assert verify([path]).ok


async def test_concurrent_reads_share_batches(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "a.log"
    log = AuditLog(path)
    writes: list[int] = []
    real_write = os.write

    def counting(fd: int, data: Any) -> int:
        writes.append(len(data))
        return real_write(fd, data)

    async def read(i: int) -> None:
        log.record("read", caller=CALLER, secret=f"app/{i}", outcome="allowed", required=True)
        await log.sync()

    monkeypatch.setattr(os, "write", counting)
    async with writer(log):
        await asyncio.gather(*(read(i) for i in range(200)))
    await log.aclose()
    assert len(docs(path)) == 200
    assert len(writes) < 20  # group commit: a handful of writes, not 200


async def test_a_failed_batch_fails_the_reads_waiting_for_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "a.log"
    log = AuditLog(path)
    async with writer(log):
        with monkeypatch.context() as patch:
            patch.setattr(os, "write", lambda fd, data: (_ for _ in ()).throw(OSError(28, "full")))
            log.record("read", caller=CALLER, secret="app/a", outcome="allowed", required=True)
            with pytest.raises(AuditUnavailable):
                await log.sync()
        log.record("read", caller=CALLER, secret="app/a", outcome="allowed", required=True)
        await log.sync()
    await log.aclose()
    assert [d["event"] for d in docs(path)] == ["records_dropped", "read"]
    assert verify([path]).ok


async def test_identical_reads_coalesce_into_one_record_with_a_count(tmp_path: Path) -> None:
    path = tmp_path / "a.log"
    log = AuditLog(path, settings=AuditConfig(path=str(path), coalesce_reads=3600))
    for _ in range(100):
        log.record(
            "read", caller=CALLER, secret="app/a", version="v1", outcome="allowed", required=True
        )
    log.record(
        "read", caller=CALLER, secret="app/a", version="v2", outcome="allowed", required=True
    )
    assert len(docs(path)) == 2
    await log.aclose()
    records = docs(path)
    assert [(d["version"], d.get("count")) for d in records] == [
        ("v1", None),
        ("v2", None),
        ("v1", 99),
    ]
    assert log.status()["coalesced"] == 99


async def test_size_rotation_carries_the_chain_across_files_and_verify_takes_a_directory(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    directory = tmp_path / "audit"
    directory.mkdir()
    path = directory / "audit.log"
    log = AuditLog(path, settings=AuditConfig(path=str(path), max_size=2000))
    write(log, 40)
    await log.aclose()
    files = sorted(directory.iterdir())
    rotated = [f for f in files if f.name != "audit.log"]
    assert len(rotated) > 3
    assert all(f.stat().st_size <= 2000 for f in files)
    assert verify([directory]).ok and verify([directory]).records == 40
    assert cli_verify(directory) == 0
    assert "ok: 40 records in" in capsys.readouterr().out
    # A line edited in a rotated file is found across files.
    victim = rotated[1]
    victim.write_bytes(victim.read_bytes().replace(b"app/s", b"app/X", 1))
    assert cli_verify(directory) == 1
    # A rotated file removed from the middle is found too.
    victim.unlink()
    assert not verify([directory]).ok


async def test_a_file_rotated_after_a_restart_is_named_by_its_first_record(
    tmp_path: Path,
) -> None:
    # Found in review: the name was the seq of the first record written since
    # the start (".000000000001" after a restart), not of the file's first.
    directory = tmp_path / "audit"
    directory.mkdir()
    path = directory / "audit.log"
    settings = AuditConfig(path=str(path), max_size=2000)
    log = AuditLog(path, settings=settings)
    write(log, 40)  # rotates: audit.log now starts past record 1
    await log.aclose()
    assert json.loads(path.read_bytes().split(b"\n", 1)[0])["seq"] > 1
    log = AuditLog(path, settings=settings)  # a restart
    write(log, 40)
    await log.aclose()
    for rotated in sorted(f for f in directory.iterdir() if f.name != "audit.log"):
        first = json.loads(rotated.read_bytes().split(b"\n", 1)[0])
        assert rotated.name == f"audit.log.{first['seq']:012d}"
    assert verify([directory]).ok and verify([directory]).records == 80


async def test_records_are_compact(tmp_path: Path) -> None:
    path = tmp_path / "a.log"
    log = AuditLog(path)
    write(log, 100)
    await log.aclose()
    first = docs(path)[0]
    assert len(first["time"]) == len("2026-03-01T12:00:00.000Z")
    assert path.stat().st_size / 100 < 300


async def test_fsync_follows_the_interval_in_a_worker_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "a.log"
    log = AuditLog(path, settings=AuditConfig(path=str(path), fsync_interval=0))
    synced: list[int] = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd))[1])
    async with writer(log):
        log.record("read", caller=CALLER, secret="a", outcome="allowed", required=True)
        await log.sync()
        for _ in range(50):
            if synced:
                break
            await asyncio.sleep(0.1)
    assert synced
    await log.aclose()


# ------------------------------------------------------------- a full disk, for real


def fill(path: Path) -> None:
    """Write ``path`` until the filesystem has not one byte left."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for size in (65536, 1):
            with contextlib.suppress(OSError):
                while True:
                    os.write(fd, b"x" * size)
    finally:
        os.close(fd)


@pytest.fixture
def tiny_fs() -> Iterator[Path]:
    """A 1 MiB tmpfs (root only), unmounted after."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mount = Path(tempfile.mkdtemp(prefix="sa-audit-fs", dir="/tmp"))
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)
        os.rmdir(mount)


@pytest.mark.root
@pytest.mark.timeout(300)
async def test_a_refusal_flood_cannot_fill_the_audit_disk_and_a_full_disk_heals(
    env: AgentEnv, tiny_fs: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before: 20,000 token-less requests filled a 1 MB audit fs in 5 s; every read then
    answered 503, and a torn ``{`` broke ``audit verify`` for good."""
    from tests.reliability.agentproc import free_port

    monkeypatch.setenv("SA_AUDIT_TOKEN", "tok-audit-flood-0123456789")
    port = free_port()
    env.configure(
        listen={
            "socket": "./agent.sock",
            "tcp": {"address": f"127.0.0.1:{port}", "tokens": {"app": "env:SA_AUDIT_TOKEN"}},
        },
        access=[{"secrets": ["*"], "uids": [os.getuid()]}, {"secrets": ["app/*"], "token": "app"}],
        audit={"path": str(tiny_fs / "audit.log")},
    )
    env.put("app/db", "value-1")
    log_path = tiny_fs / "audit.log"
    async with env.running() as agent, aiohttp.ClientSession() as tcp:

        async def refused(n: int) -> None:
            for _ in range(n):
                async with tcp.get(f"http://127.0.0.1:{port}/v1/secrets/app/db") as resp:
                    assert resp.status == 403

        # The finding's 20,000 in the full run; 5,000 already overflowed the 1 MB disk before.
        await asyncio.gather(*(refused(FLOOD // 8) for _ in range(8)))
        assert await agent.value("app/db") == b"value-1"
        flood_bytes = log_path.stat().st_size
        print("AUDIT FLOOD", json.dumps({"requests": FLOOD, "audit_bytes": flood_bytes}))
        assert flood_bytes < 16 * 1024
        # Fill the disk to the last byte, then read: refused (503), nothing torn.
        filler = tiny_fs / "filler"
        fill(filler)
        # The log's last tmpfs page may still hold a few records; then every read is 503.
        statuses = []
        for _ in range(200):
            status, _, body = await agent.get("/v1/secrets/app/db", format="raw")
            statuses.append(status)
            assert status in (200, 503) and (status == 200 or b"value-1" not in body)
        first = statuses.index(503)
        assert set(statuses[first:]) == {503}
        assert verify([log_path]).ok
        assert log_path.read_bytes().endswith(b"\n")
        filler.unlink()
        assert await agent.value("app/db") == b"value-1"
    verdict = verify([log_path])
    assert verdict.ok
    events = [json.loads(line)["event"] for line in log_path.read_bytes().splitlines()]
    assert "records_dropped" in events
