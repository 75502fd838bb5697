"""A bounded soak: concurrent reads, a ``put`` every second and config reloads.

The agent runs in its own process so its RSS and descriptor count can be
read at the start (after a warm-up) and at the end. CI runs a short form;
``RELIABILITY_FULL=1`` runs at least 1,000,000 requests
(docs/reliability.md). Every answer must be a 200 with a value that was put,
and every value put must have been served.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from typing import Any

import aiohttp
import pytest
import yaml

from tests.agentenv import AgentEnv
from tests.reliability.agentproc import agent_process, proc_fds, proc_rss_kb

FULL = bool(os.environ.get("RELIABILITY_FULL") or os.environ.get("SA_RELIABILITY_FULL"))
TARGET = int(os.environ.get("SA_SOAK_REQUESTS", 1_000_000 if FULL else 0))
DURATION = 15.0  # the CI form: this many seconds (bounded), whatever the count
WORKERS = 8


@pytest.mark.timeout(3 * 3600 if FULL else 120)
async def test_soak_reads_rotations_and_reloads_leak_nothing(
    env: AgentEnv, record_property: Any
) -> None:
    env.put("app/db", "value-0")
    put_values = ["value-0"]
    seen: set[str] = set()
    errors: list[str] = []
    count = 0
    stop = asyncio.Event()
    with agent_process(env) as agent:
        connector = aiohttp.UnixConnector(path=str(env.socket), limit=WORKERS)
        async with aiohttp.ClientSession(connector=connector) as session:

            async def reader() -> None:
                nonlocal count
                url = "http://localhost/v1/secrets/app/db?format=raw"
                while not stop.is_set():
                    try:
                        async with session.get(url) as resp:
                            body = await resp.text()
                            if resp.status != 200:
                                errors.append(f"{resp.status} {body[:200]}")
                            else:
                                seen.add(body)
                    except (aiohttp.ClientError, OSError) as exc:
                        errors.append(repr(exc))
                    count += 1

            async def rotations() -> None:
                i = 0
                while not stop.is_set():
                    await asyncio.sleep(1.0)
                    i += 1
                    value = f"value-{i}"
                    await asyncio.to_thread(env.put, "app/db", value)
                    put_values.append(value)

            reloads = 0

            async def reload_config() -> None:
                nonlocal reloads
                while not stop.is_set():
                    await asyncio.sleep(5.0)
                    doc = yaml.safe_load(env.config_path.read_text())
                    doc.setdefault("refresh", {})["jitter"] = 0.1 + 0.05 * (reloads % 2)
                    env.config_path.write_text(yaml.safe_dump(doc))
                    reloads += 1

            tasks = [asyncio.create_task(reader()) for _ in range(WORKERS)]
            tasks += [asyncio.create_task(rotations()), asyncio.create_task(reload_config())]
            started = time.monotonic()
            while count < 2000 and time.monotonic() - started < 60:
                await asyncio.sleep(0.1)
            rss0, fds0, count0 = proc_rss_kb(agent.pid), proc_fds(agent.pid), count
            began = time.monotonic()
            while True:
                await asyncio.sleep(0.5)
                if TARGET and count >= TARGET:
                    break
                if not TARGET and time.monotonic() - began >= DURATION:
                    break
            stop.set()
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            elapsed = time.monotonic() - began
            # The last rotation: give it a moment to be served.
            for _ in range(100):
                async with session.get("http://localhost/v1/secrets/app/db?format=raw") as resp:
                    seen.add(await resp.text())
                if put_values[-1] in seen:
                    break
                await asyncio.sleep(0.05)
        rss1, fds1 = proc_rss_kb(agent.pid), proc_fds(agent.pid)
        log = agent.log()
    figures = {
        "requests": count,
        "requests_measured": count - count0,
        "seconds": round(elapsed, 1),
        "req_per_s": round((count - count0) / elapsed),
        "errors": len(errors),
        "rotations": len(put_values) - 1,
        "rotations_observed": len(set(put_values) & seen) - 1,
        "config_reloads_written": reloads,
        "config_reloads_applied": log.count("config reloaded"),
        "rss_start_kb": rss0,
        "rss_end_kb": rss1,
        "rss_growth_pct": round(100 * (rss1 - rss0) / rss0, 2),
        "fds_start": fds0,
        "fds_end": fds1,
    }
    record_property("soak", figures)
    print("SOAK FIGURES", json.dumps(figures))
    assert not errors, errors[:5]
    assert set(put_values) <= seen, sorted(set(put_values) - seen)
    assert "Traceback" not in log
    assert fds1 <= fds0 + 5
    assert rss1 <= rss0 * (1.05 if FULL else 1.5)
