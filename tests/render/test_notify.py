"""Notifications: debounced, by command and by signal, against real child processes."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from agent.config import OnChangeConfig, RenderConfig, TemplateConfig, WaitConfig
from agent.metrics import Metrics
from agent.render.notify import Notifier
from agent.render.renderer import Renderer
from tests.render.conftest import DictSource, make_secret

COUNTER = textwrap.dedent("""
    import os, signal, sys, time
    path = sys.argv[1]
    count = 0
    def on_hup(signum, frame):
        global count
        count += 1
        with open(path + ".tmp", "w") as fh:
            fh.write(str(count))
        os.replace(path + ".tmp", path)
    signal.signal(signal.SIGHUP, on_hup)
    open(path + ".ready", "w").close()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        time.sleep(0.05)
""")


async def _until(check: Any, timeout: float = 10) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not check():
        if loop.time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.01)


async def test_ten_rotations_within_wait_min_give_one_command_run(tmpfs: Path) -> None:
    dest, log = tmpfs / "pw", tmpfs / "runs"
    source = DictSource({"db": make_secret("db", "v0")})
    cfg = TemplateConfig.model_validate(
        {
            "destination": str(dest),
            "secret": "db",
            "wait": {"min": "500ms", "max": "10s"},
            "on_change": {
                "command": [sys.executable, "-c", f"open({str(log)!r}, 'a').write('run\\n')"]
            },
        }
    )
    r = Renderer([cfg], source, render_config=RenderConfig(), metrics=Metrics())
    task = asyncio.create_task(r.run())
    try:
        await _until(lambda: log.exists())  # the first render notifies once
        for i in range(1, 11):
            source.secrets["db"] = make_secret("db", f"v{i}", version=f"v{i}")
            r.on_secret_changed("db")
            await asyncio.sleep(0.02)
        await _until(lambda: dest.read_bytes() == b"v10")
        await _until(lambda: log.read_text().count("run") == 2)
        await asyncio.sleep(1.0)  # well past wait.min: nothing more arrives
        assert log.read_text().count("run") == 2
        assert r.status()["templates"][0]["notifications"] == 2
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_signal_reaches_a_real_process_through_its_pid_file(tmp_path: Path) -> None:
    count_file = tmp_path / "count"
    child = subprocess.Popen([sys.executable, "-c", COUNTER, str(count_file)])
    try:
        await _until(lambda: Path(str(count_file) + ".ready").exists())
        pid_file = tmp_path / "app.pid"
        pid_file.write_text(f"{child.pid}\n")
        n = Notifier(
            OnChangeConfig(signal="HUP", pid_file=pid_file),
            WaitConfig(min=0.2, max=5.0),
            where="t",
            metrics=Metrics(),
        )
        task = asyncio.create_task(n.run())
        for _ in range(10):
            n.changed()
            await asyncio.sleep(0.01)
        await _until(lambda: count_file.exists())
        await asyncio.sleep(0.5)
        assert count_file.read_text() == "1"
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()


async def test_wait_max_bounds_a_continuous_stream_of_changes() -> None:
    n = Notifier(
        OnChangeConfig(command=["true"]), WaitConfig(min=0.3, max=0.6), where="t", metrics=Metrics()
    )
    task = asyncio.create_task(n.run())
    loop = asyncio.get_running_loop()
    start = loop.time()
    while loop.time() - start < 1.5:  # a change every 50 ms, never quiet for wait.min
        n.changed()
        await asyncio.sleep(0.05)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    assert n.sent >= 2  # wait.max forced notifications despite the stream


async def test_a_failing_or_hanging_command_is_counted_and_does_not_stop_others() -> None:
    metrics = Metrics()
    hang = Notifier(
        OnChangeConfig(command=["sleep", "30"], timeout=0.3),
        WaitConfig(),
        where="a",
        metrics=metrics,
    )
    fail = Notifier(OnChangeConfig(command=["false"]), WaitConfig(), where="b", metrics=metrics)
    missing = Notifier(
        OnChangeConfig(command=["/nonexistent/cmd"]), WaitConfig(), where="c", metrics=metrics
    )
    await asyncio.gather(hang.fire(), fail.fire(), missing.fire())

    def sample(outcome: str) -> float:
        return (
            metrics.registry.get_sample_value(
                "secrets_agent_notifications_total", {"kind": "command", "outcome": outcome}
            )
            or 0
        )

    assert sample("timeout") == 1
    assert sample("error") == 2


async def test_ten_rotations_send_one_signal_to_the_exec_child(tmp_path: Path, tmpfs: Path) -> None:
    """Through the renderer, with no pid configured: the signal goes to ``child_pid()``."""
    count_file = tmp_path / "count"
    child = subprocess.Popen([sys.executable, "-c", COUNTER, str(count_file)])
    source = DictSource({"db": make_secret("db", "v0")})
    cfg = TemplateConfig.model_validate(
        {
            "destination": str(tmpfs / "pw"),
            "secret": "db",
            "wait": {"min": "500ms", "max": "10s"},
            "on_change": {"signal": "SIGHUP"},
        }
    )
    metrics = Metrics()
    r = Renderer(
        [cfg], source, render_config=RenderConfig(), metrics=metrics, child_pid=lambda: child.pid
    )
    try:
        await _until(lambda: Path(str(count_file) + ".ready").exists())
        task = asyncio.create_task(r.run())
        await _until(lambda: count_file.exists() and count_file.read_text() == "1")
        for i in range(1, 11):
            source.secrets["db"] = make_secret("db", f"v{i}", version=f"v{i}")
            r.on_secret_changed("db")
            await asyncio.sleep(0.02)
        await _until(lambda: count_file.read_text() == "2")
        await asyncio.sleep(1.0)  # well past wait.min: no second signal for the burst
        assert count_file.read_text() == "2"
        assert (tmpfs / "pw").read_bytes() == b"v10"
        ok = metrics.registry.get_sample_value(
            "secrets_agent_notifications_total", {"kind": "signal", "outcome": "ok"}
        )
        assert ok == 2
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()


async def test_a_signal_with_no_process_to_receive_it_is_counted() -> None:
    metrics = Metrics()
    n = Notifier(OnChangeConfig(signal="SIGHUP"), WaitConfig(), where="t", metrics=metrics)
    await n.fire()
    sample = metrics.registry.get_sample_value(
        "secrets_agent_notifications_total", {"kind": "signal", "outcome": "no_target"}
    )
    assert sample == 1


async def test_a_command_running_at_shutdown_is_killed_and_reaped(tmp_path: Path) -> None:
    pid_file = tmp_path / "pid"
    script = (
        f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(30)"
    )
    n = Notifier(
        OnChangeConfig(command=[sys.executable, "-c", script], timeout=60),
        WaitConfig(),
        where="t",
        metrics=Metrics(),
    )
    task = asyncio.create_task(n.fire())
    await _until(lambda: pid_file.exists() and pid_file.read_text() != "")
    pid = int(pid_file.read_text())
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
