"""A safety-net resync pass over N cached secrets, and what readers feel meanwhile.

In one process, as the agent wires it: a cache and refresher over the
directory store, loaded once; then one ``resync`` pass (nothing changed, and
then with 1% of the secrets rotated), timed, while a reader task reads
cached secrets in a loop and records each read's latency (so a pass that
blocks the event loop shows as read latency).

    python -m bench.resync [--counts 1000,10000]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench._store import name_of, populate
from bench.loadclient import percentile


async def _measure(directory: Path, count: int) -> dict[str, Any]:
    from agent.cache import SecretCache
    from agent.config import load_config
    from agent.core import Core
    from agent.refresh import Refresher

    config = load_config(directory / "agent.yaml")
    core = Core.build(config)
    cache = SecretCache(core.resolver, settings=config.refresh, metrics=core.metrics)
    refresher = Refresher(
        cache,
        core.store,
        settings=config.refresh,
        patterns=config.secrets,
        metrics=core.metrics,
    )
    t0 = time.perf_counter()
    await refresher.load_all()
    load_s = time.perf_counter() - t0
    out: dict[str, Any] = {"secrets": count, "load_s": load_s}
    writer = core.writer()
    for label, rotate in (("unchanged", 0), ("1pct_rotated", max(1, count // 100))):
        for i in range(rotate):
            await writer.put(name_of(i * 97 % count), b"rotated-value")
        lat: list[float] = []
        stop = asyncio.Event()

        async def reader(stop: asyncio.Event = stop, lat: list[float] = lat) -> None:
            i = 0
            while not stop.is_set():
                started = time.perf_counter()
                await cache.get(name_of(i % count))
                await asyncio.sleep(0)
                lat.append(time.perf_counter() - started)
                i += 7

        task = asyncio.create_task(reader())
        await asyncio.sleep(0.2)
        lat.clear()
        t0 = time.perf_counter()
        await refresher.resync(trigger="poll")
        elapsed = time.perf_counter() - t0
        stop.set()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        out[label] = {
            "resync_s": elapsed,
            "rotated": rotate,
            "reads": len(lat),
            "read_p50_ms": percentile(lat, 50) * 1000,
            "read_p99_ms": percentile(lat, 99) * 1000,
            "read_max_ms": max(lat) * 1000 if lat else float("nan"),
        }
    await cache.aclose()
    await core.aclose()
    return out


def run(counts: list[int]) -> list[dict[str, Any]]:
    rows = []
    for count in counts:
        with tempfile.TemporaryDirectory(prefix="sa-resync-") as tmp:
            directory = Path(tmp)
            asyncio.run(populate(directory, count))
            row = asyncio.run(_measure(directory, count))
            rows.append(row)
            for label in ("unchanged", "1pct_rotated"):
                r = row[label]
                print(
                    f"  resync {count:>6} ({label}): {r['resync_s']:.2f}s, reads meanwhile "
                    f"p99 {r['read_p99_ms']:.2f} ms, max {r['read_max_ms']:.2f} ms",
                    flush=True,
                )
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--counts", default="1000,10000")
    args = parser.parse_args()
    print(json.dumps(run([int(c) for c in args.counts.split(",")]), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
