"""Finding 5 and 6 (store side): a broken watch is an outage, and quiet failures are heard.

Regression tests: before the fix a broken watch left the poll loop asleep for
``watch_interval`` (5 minutes by default), so nothing was marked stale and no
"store unavailable" line was logged; a stage map naming a missing version
logged nothing at all.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

import pytest

from tests.test_refresh import World

pytestmark = pytest.mark.timeout(60)


@contextlib.asynccontextmanager
async def _running(w: World) -> AsyncIterator[asyncio.Task[None]]:
    task = asyncio.create_task(w.refresher.run())
    try:
        await asyncio.wait_for(w.refresher.ready.wait(), 10)
        yield task
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def _until(predicate: object, timeout: float = 10.0) -> None:
    """Wait (bounded; a liveness bound, not a timing assertion) until ``predicate()``."""
    assert callable(predicate)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        assert loop.time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


def _lines(caplog: pytest.LogCaptureFixture, text: str, level: int = logging.INFO) -> list[str]:
    return [r.getMessage() for r in caplog.records if text in r.getMessage() and r.levelno >= level]


async def test_a_broken_watch_marks_every_secret_stale_at_once_with_one_line_each_way(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # A long safety-net interval, as in production: the fix must not wait for it.
    w = World(interval="1h", watch_interval="1h", backoff_initial=0.05, backoff_max=0.2)
    for i in range(20):
        await w.writer.put(f"s{i}", b"v")
    w.clock.now = 0.0  # the refresher's clock only times the outage line
    caplog.set_level(logging.DEBUG, logger="agent.refresh")
    async with _running(w):
        await _until(lambda: w.refresher.watching)
        w.store.unavailable = True
        await _until(lambda: all(e["stale"] for e in w.cache.status()))
        assert len(w.cache.status()) == 20
        # Several retries happen while it is down, still one WARNING line.
        await _until(lambda: w.store.calls["list_names"] >= 4)
        assert len(_lines(caplog, "store unavailable", logging.WARNING)) == 1
        w.store.unavailable = False
        await w.writer.put("s3", b"rotated during the outage")
        await _until(lambda: not any(e["stale"] for e in w.cache.status()))
        await _until(lambda: w.cache.peek("s3") is not None and w.refresher.watching)
        await _until(lambda: w.cache.peek("s3").value.reveal() == b"rotated during the outage")  # type: ignore[union-attr]
        await _until(lambda: w.refresher.store_down_since is None)
    assert len(_lines(caplog, "store available again")) == 1
    assert len(_lines(caplog, "store unavailable", logging.WARNING)) == 1


async def test_a_stage_naming_a_missing_version_is_logged_rate_limited(
    caplog: pytest.LogCaptureFixture,
) -> None:
    w = World()
    await w.writer.put("db", b"v1")
    await w.refresher.load_all()
    # As a broken writer or a hand edit would leave it (the store API refuses this).
    w.store._backend.secrets["db"].stages["CURRENT"] = "0" * 32
    w.store._backend.secrets["db"].revision = "broken"
    with caplog.at_level(logging.WARNING, logger="agent.refresh"):
        for _ in range(5):
            await w.refresher.resync(trigger="poll")
    lines = _lines(caplog, "'db'", logging.WARNING)
    assert len(lines) == 1, lines
    assert "does not exist" in lines[0] or "no version" in lines[0]
    assert (await w.cache.get("db")).secret.value.reveal() == b"v1"
