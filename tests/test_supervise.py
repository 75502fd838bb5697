"""The one-for-one supervisor: a failing part restarts alone, with backoff, counted."""

from __future__ import annotations

import asyncio
import contextlib
import logging

import pytest

from agent.errors import BackendUnavailable
from agent.metrics import Metrics
from agent.ratelog import RateLimitedLog
from agent.supervise import Supervisor, error_kind, part_name

pytestmark = pytest.mark.timeout(30)


class Flaky:
    """Fails ``failures`` times (a bug: a KeyError quoting a value), then runs forever."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.starts = 0
        self.running = asyncio.Event()

    async def run(self) -> None:
        self.starts += 1
        if self.starts <= self.failures:
            raise KeyError("hunter2-not-for-logs")
        self.running.set()
        await asyncio.Event().wait()


class Steady:
    def __init__(self) -> None:
        self.ticks = 0

    async def run(self) -> None:
        while True:
            self.ticks += 1
            await asyncio.sleep(0.005)


def _restarts(metrics: Metrics, part: str) -> float:
    value = metrics.registry.get_sample_value("secrets_agent_part_restarts_total", {"part": part})
    return value or 0.0


async def test_a_failing_part_restarts_alone_with_backoff_while_others_run(
    caplog: pytest.LogCaptureFixture,
) -> None:
    metrics = Metrics()
    sup = Supervisor(metrics=metrics, backoff_initial=0.01, backoff_max=0.05)
    flaky, steady = Flaky(failures=3), Steady()
    sup.add(flaky.run)
    sup.add(steady.run)
    caplog.set_level(logging.ERROR, logger="agent.supervise")
    task = asyncio.create_task(sup.run())
    try:
        await asyncio.wait_for(flaky.running.wait(), 10)
        ticks = steady.ticks
        await asyncio.sleep(0.05)
        assert steady.ticks > ticks  # never interrupted
        assert not task.done()
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    assert flaky.starts == 4
    assert _restarts(metrics, "flaky") == 3
    assert _restarts(metrics, "steady") == 0
    status = {p["part"]: p for p in sup.status()["parts"]}
    assert status["flaky"]["restarts"] == 3
    assert status["flaky"]["last_error"] == "KeyError"
    assert status["steady"]["restarts"] == 0
    # Logged once (rate-limited), with context, never with the exception's message.
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1
    assert "'flaky' failed with KeyError" in lines[0] and "in run" in lines[0]
    assert "hunter2" not in "\n".join(lines)


async def test_a_part_that_returns_is_done_not_restarted() -> None:
    calls = 0

    async def once() -> None:
        nonlocal calls
        calls += 1

    sup = Supervisor(metrics=Metrics(), backoff_initial=0.01)
    await asyncio.wait_for(sup.run([once]), 5)
    assert calls == 1
    assert sup.status()["parts"][0]["state"] == "done"


async def test_cancellation_stops_every_part() -> None:
    sup = Supervisor(metrics=Metrics())
    steady = Steady()
    task = asyncio.create_task(sup.run([steady.run]))
    await asyncio.sleep(0.02)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert sup.status()["parts"][0]["state"] == "stopped"


async def test_an_exception_group_is_reported_by_its_first_leaf() -> None:
    async def grouped() -> None:
        async with asyncio.TaskGroup() as tg:
            tg.create_task(asyncio.sleep(10))

            async def boom() -> None:
                raise BackendUnavailable("etcd down")

            tg.create_task(boom())

    sup = Supervisor(metrics=Metrics(), backoff_initial=0.01, backoff_max=0.01)
    task = asyncio.create_task(sup.run([grouped]))
    for _ in range(2000):  # a liveness bound of 20 s
        if sup.parts and sup.parts[0].restarts >= 1:
            break
        await asyncio.sleep(0.01)
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    assert sup.parts[0].last_error == "BackendUnavailable"


def test_part_names_are_snake_case_labels() -> None:
    class KeyWatch:
        async def run(self) -> None: ...

    class RotationScheduler:
        async def run(self) -> None: ...

    async def _watch_config() -> None: ...

    assert part_name(KeyWatch().run) == "key_watch"
    assert part_name(RotationScheduler().run) == "rotation_scheduler"
    assert part_name(_watch_config) == "watch_config"
    assert error_kind(ExceptionGroup("g", [ValueError("x")])) == "ValueError"


def test_two_parts_of_one_name_get_distinct_labels() -> None:
    sup = Supervisor(metrics=Metrics())
    sup.add(Steady().run)
    sup.add(Steady().run)
    assert [p.name for p in sup.parts] == ["steady", "steady_2"]


def test_rate_limited_log_holds_back_repeats_and_counts_them(
    caplog: pytest.LogCaptureFixture,
) -> None:
    now = [0.0]
    quiet = RateLimitedLog(logging.getLogger("t.ratelog"), interval=60, clock=lambda: now[0])
    caplog.set_level(logging.WARNING, logger="t.ratelog")
    assert quiet.warning("k", "problem %s", "x")
    for _ in range(9):
        now[0] += 1
        assert not quiet.warning("k", "problem %s", "x")
    assert quiet.warning("other", "another")
    now[0] += 60
    assert quiet.warning("k", "problem %s", "x")
    msgs = [r.getMessage() for r in caplog.records]
    assert msgs == [
        "problem x",
        "another",
        "problem x (9 similar lines held back in the last 69s)",
    ]
    quiet.forget("k")
    assert quiet.warning("k", "problem %s", "x")
