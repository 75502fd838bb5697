"""A fleet of agents on one etcd: how fast does a rotation reach all of them?

Starts N agent processes (default 20), each with its own socket, all reading
one etcd prefix; rotates a secret M times (default 20) through the writer code
path; and prints p50/p99 of the time until *every* agent serves the new value,
plus the etcd requests per second the fleet generates at idle and during the
rotations (from etcd's grpc_server_started_total). The baseline is the same
measurement for a single agent, in the same run.

    python bench/fleet.py --etcd-endpoint 127.0.0.1:2379 [--agents 20] [--rotations 20]

Start etcd yourself on loopback (see docs/development.md), or pass
--start-etcd to have this script run /usr/bin/etcd on free loopback ports and
stop it by pid at the end. Every wait is bounded.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._agentproc import AgentProcess, init_dir, percentile

NAME = "fleet/rotating"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def etcd_process(directory: Path) -> Any:
    client, peer = _free_port(), _free_port()
    proc = subprocess.Popen(
        [
            "etcd",
            "--data-dir",
            str(directory / "etcd"),
            "--name",
            "bench",
            "--listen-client-urls",
            f"http://127.0.0.1:{client}",
            "--advertise-client-urls",
            f"http://127.0.0.1:{client}",
            "--listen-peer-urls",
            f"http://127.0.0.1:{peer}",
            "--initial-advertise-peer-urls",
            f"http://127.0.0.1:{peer}",
            "--initial-cluster",
            f"bench=http://127.0.0.1:{peer}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 20
        while True:
            with contextlib.suppress(OSError):
                urllib.request.urlopen(f"http://127.0.0.1:{client}/health", timeout=1).close()
                break
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError("etcd did not become healthy within 20 s")
            time.sleep(0.1)
        yield f"127.0.0.1:{client}"
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()


def etcd_requests(endpoint: str) -> float:
    """Unary gRPC requests etcd has started so far."""
    with urllib.request.urlopen(f"http://{endpoint}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("grpc_server_started_total") and 'grpc_type="unary"' in line
    )


async def run_fleet(endpoint: str, agents: int, rotations: int, idle: float) -> dict[str, Any]:
    from agent.config import load_config
    from agent.core import Core

    root = Path(tempfile.mkdtemp(prefix="sa-fleet-", dir="/tmp"))
    prefix = f"/fleet-{uuid.uuid4().hex[:8]}"
    store = {"type": "etcd", "endpoints": [endpoint], "prefix": prefix}
    try:
        own = {"listen": {"socket": "./agent.sock"}, "audit": {"path": "./audit.log"}}
        first = init_dir(root / "a0", {"store": store, "secrets": [NAME], **own})
        core = Core.build(load_config(first))
        writer = core.writer()
        await writer.put(NAME, b"initial")
        configs = [first]
        for i in range(1, agents):
            d = root / f"a{i}"
            d.mkdir()
            shutil.copy(first, d / "agent.yaml")
            shutil.copy(root / "a0" / "keyring.json", d / "keyring.json")
            os.chmod(d / "keyring.json", 0o600)
            (d / "store").mkdir()
            configs.append(d / "agent.yaml")
        async with contextlib.AsyncExitStack() as stack:
            procs = [
                await stack.enter_async_context(AgentProcess(c, c.parent / "agent.sock"))
                for c in configs
            ]
            r0 = etcd_requests(endpoint)
            await asyncio.sleep(idle)
            idle_rps = (etcd_requests(endpoint) - r0) / idle
            latencies: list[float] = []
            r1, t1 = etcd_requests(endpoint), time.monotonic()
            for i in range(rotations):
                value = f"rotation-{i}-{uuid.uuid4().hex}".encode()
                await writer.put(NAME, value)
                committed = time.perf_counter()
                pending = set(range(len(procs)))
                deadline = committed + 10
                while pending and time.perf_counter() < deadline:
                    got = await asyncio.gather(*(procs[j].get_raw(NAME) for j in pending))
                    pending = {j for j, v in zip(sorted(pending), got, strict=True) if v != value}
                    if pending:
                        await asyncio.sleep(0.001)
                if pending:
                    raise RuntimeError(f"rotation {i}: {len(pending)} agents never saw it")
                latencies.append(time.perf_counter() - committed)
                await asyncio.sleep(0.05)
            busy_rps = (etcd_requests(endpoint) - r1) / (time.monotonic() - t1)
        await core.aclose()
        return {"latencies": latencies, "idle_rps": idle_rps, "busy_rps": busy_rps}
    finally:
        shutil.rmtree(root, ignore_errors=True)


def report(label: str, result: dict[str, Any]) -> None:
    ms = [v * 1000 for v in result["latencies"]]
    print(
        f"{label:<10} all agents serve the new value: p50={percentile(ms, 50):7.2f} ms  "
        f"p99={percentile(ms, 99):7.2f} ms  max={max(ms):7.2f} ms  (n={len(ms)})"
    )
    print(
        f"{label:<10} etcd requests/s: idle {result['idle_rps']:.2f}, "
        f"during rotations {result['busy_rps']:.1f} (includes the writer's)"
    )


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--etcd-endpoint")
    parser.add_argument("--start-etcd", action="store_true")
    parser.add_argument("--agents", type=int, default=20)
    parser.add_argument("--rotations", type=int, default=20)
    parser.add_argument("--idle", type=float, default=5.0, help="seconds of idle measurement")
    args = parser.parse_args()
    with contextlib.ExitStack() as stack:
        endpoint = args.etcd_endpoint
        if args.start_etcd or not endpoint:
            tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="sa-etcd-")))
            endpoint = stack.enter_context(etcd_process(tmp))
        baseline = await run_fleet(endpoint, 1, args.rotations, args.idle)
        report("1 agent", baseline)
        fleet = await run_fleet(endpoint, args.agents, args.rotations, args.idle)
        report(f"{args.agents} agents", fleet)
        b50 = percentile(baseline["latencies"], 50)
        print(
            f"ratio: fleet p50 / single-agent p50 = "
            f"{percentile(fleet['latencies'], 50) / max(b50, 1e-9):.1f}x"
        )
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
