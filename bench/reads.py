"""Cached reads: the agent against a bare aiohttp server, same client, same run.

Starts a real agent (default config: access rules and audit on) with one
secret of ~100 bytes, and a bare aiohttp server on another Unix socket that
answers the very body the agent answers. The same closed-loop keep-alive
client (bench/loadclient.py) then drives each at every concurrency, the two
alternating, so machine load hits both alike. Reports req/s, p50/p99 and
the client's and server's CPU use per second of wall time.

    python -m bench.reads [--duration 5] [--concurrency 1,4,16,64] [--uvloop]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bench._agentproc import AgentProcess, init_dir
from bench.loadclient import run_load

NAME = "bench/db-password"
VALUE = b"x" * 100


@contextlib.contextmanager
def baseline(directory: Path, body: bytes, *, uvloop: bool) -> Iterator[tuple[str, int]]:
    """The bare aiohttp server, started as a child and stopped by pid."""
    sock = directory / "bare.sock"
    body_file = directory / "body.json"
    body_file.write_bytes(body)
    argv = [sys.executable, "-m", "bench.baseline", str(sock), str(body_file)]
    if uvloop:
        argv.append("--uvloop")
    proc = subprocess.Popen(argv, start_new_session=True)
    try:
        deadline = time.monotonic() + 20
        while not sock.exists():
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError("baseline server did not start")
            time.sleep(0.05)
        yield str(sock), proc.pid
    finally:
        os.kill(proc.pid, signal.SIGTERM)
        proc.wait(timeout=10)


async def prepare(directory: Path, *, uvloop: bool) -> tuple[Path, Path]:
    from agent.config import load_config
    from agent.core import Core

    overrides: dict[str, Any] = {
        "secrets": [NAME],
        "listen": {"socket": str(directory / "agent.sock")},
        "audit": {"path": str(directory / "audit.log")},
    }
    cfg = init_dir(directory, overrides)
    config = load_config(cfg)
    core = Core.build(config)
    await core.writer().put(NAME, VALUE)
    await core.aclose()
    return cfg, config.listen.socket


def run(
    *, duration: float, concurrency: list[int], uvloop: bool, ping: bool = True
) -> dict[str, Any]:
    """One read benchmark; returns the rows per target and concurrency."""
    env_before = os.environ.get("SECRETS_AGENT_UVLOOP")
    os.environ["SECRETS_AGENT_UVLOOP"] = "1" if uvloop else "0"
    try:
        return asyncio.run(
            _run(duration=duration, concurrency=concurrency, uvloop=uvloop, ping=ping)
        )
    finally:
        if env_before is None:
            os.environ.pop("SECRETS_AGENT_UVLOOP", None)
        else:
            os.environ["SECRETS_AGENT_UVLOOP"] = env_before


async def _run(
    *, duration: float, concurrency: list[int], uvloop: bool, ping: bool
) -> dict[str, Any]:
    rows: list[dict[str, Any]] = []
    path = "/v1/secrets/" + urllib.parse.quote(NAME, safe="/")
    with tempfile.TemporaryDirectory(prefix="sa-reads-") as tmp:
        directory = Path(tmp)
        cfg, sock = await prepare(directory, uvloop=uvloop)
        async with AgentProcess(cfg, sock) as agent:
            async with agent.session.get(f"http://localhost{path}") as resp:
                body = await resp.read()
                assert resp.status == 200, resp.status
            with baseline(directory, body, uvloop=uvloop) as (bare_sock, bare_pid):
                assert agent.proc is not None
                targets = [("agent", str(sock), agent.proc.pid), ("bare", bare_sock, bare_pid)]
                # warm-up
                for _, s, _pid in targets:
                    await asyncio.to_thread(
                        run_load, s, path, concurrency=4, duration=min(1.0, duration)
                    )
                routes = [("secret", path)] + ([("ping", "/ping")] if ping else [])
                for route, p in routes:
                    for conc in concurrency if route == "secret" else [4]:
                        for target, s, pid in targets:
                            row = await asyncio.to_thread(
                                run_load, s, p, concurrency=conc, duration=duration, server_pid=pid
                            )
                            row.update(target=target, route=route, uvloop=uvloop)
                            rows.append(row)
                            print(
                                f"  {route:6} {target:5} c={conc:<3} {row['rps']:8.0f} req/s "
                                f"p50={row['p50_ms']:.3f} p99={row['p99_ms']:.3f} ms "
                                f"client_cpu={row['client_cpu']:.2f} "
                                f"server_cpu={row['server_cpu']:.2f} "
                                f"{row['statuses']}",
                                flush=True,
                            )
    return {"uvloop": uvloop, "rows": rows, "body_bytes": len(body)}


def ratios(result: dict[str, Any]) -> list[dict[str, Any]]:
    """agent/bare throughput per route and concurrency."""
    by = {(r["route"], r["concurrency"], r["target"]): r for r in result["rows"]}
    out = []
    for (route, conc, target), row in by.items():
        if target != "agent":
            continue
        bare = by[(route, conc, "bare")]
        out.append({"route": route, "concurrency": conc, "ratio": row["rps"] / bare["rps"]})
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--concurrency", default="1,4,16,64")
    parser.add_argument("--uvloop", action="store_true")
    args = parser.parse_args()
    result = run(
        duration=args.duration,
        concurrency=[int(c) for c in args.concurrency.split(",")],
        uvloop=args.uvloop,
    )
    for r in ratios(result):
        print(f"ratio {r['route']} c={r['concurrency']}: {r['ratio']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
