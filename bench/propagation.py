"""How fast does a rotation reach the app? Push (watch) versus polling.

Rotates one secret N times through the writer code path that ``secrets-agent
put`` uses, against a real agent process on the directory store, and measures
for each rotation the time from the committed stage move until (a) the socket
serves the new value and (b) the rendered file holds it. Prints p50/p90/p99/max
and the fetches and decrypts the agent performed per rotation. Then the same
with push disabled (polling only), as the baseline: its propagation is bounded
by the poll interval plus jitter.

    python bench/propagation.py [--rotations 100] [--poll-rotations 10]
        [--poll-interval 1s] [--store file|etcd --etcd-endpoint 127.0.0.1:2379]

Loopback and Unix sockets only; every wait is bounded.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._agentproc import AgentProcess, init_dir, percentile, summary

NAME = "bench/rotating"
TIMEOUT = 10.0


async def _wait(check: Any, deadline: float) -> float | None:
    while time.perf_counter() < deadline:
        if await check():
            return time.perf_counter()
        await asyncio.sleep(0.0005)
    return None


async def run_mode(
    *,
    push: bool,
    rotations: int,
    poll_interval: str,
    store: dict[str, Any] | None,
    render_root: Path,
) -> dict[str, Any]:
    from agent.config import load_config
    from agent.core import Core

    with tempfile.TemporaryDirectory(prefix="sa-bench-") as tmp:
        directory = Path(tmp)
        dest = render_root / f"{uuid.uuid4().hex[:8]}-value" if render_root else None
        overrides: dict[str, Any] = {
            "refresh": {"watch": push, "interval": poll_interval, "jitter": 0.1},
            "secrets": [NAME],
        }
        if dest is not None:
            overrides["templates"] = [{"destination": str(dest), "secret": NAME, "format": "raw"}]
        if store is not None:
            overrides["store"] = store
        cfg = init_dir(directory, overrides)
        config = load_config(cfg)
        core = Core.build(config)
        writer = core.writer()
        await writer.put(NAME, b"initial")
        socket_lat: list[float] = []
        file_lat: list[float] = []
        async with AgentProcess(cfg, config.listen.socket) as agent:
            fetch0 = await agent.metric("secrets_agent_secret_fetches_total", outcome="ok")
            dec0 = await agent.metric("secrets_agent_decrypts_total", outcome="ok")
            for i in range(rotations):
                value = f"rotation-{i}-{uuid.uuid4().hex}".encode()
                await writer.put(NAME, value)
                committed = time.perf_counter()
                deadline = committed + TIMEOUT

                async def served(v: bytes = value) -> bool:
                    return await agent.get_raw(NAME) == v

                async def rendered(v: bytes = value) -> bool:
                    if dest is None:
                        return True
                    try:
                        return dest.read_bytes() == v
                    except OSError:
                        return False

                t_sock = await _wait(served, deadline)
                t_file = await _wait(rendered, deadline)
                if t_sock is None or t_file is None:
                    raise RuntimeError(f"rotation {i} not propagated within {TIMEOUT}s")
                socket_lat.append(t_sock - committed)
                file_lat.append(t_file - committed)
                await asyncio.sleep(0.02)  # let the agent settle between rotations
            fetches = (
                await agent.metric("secrets_agent_secret_fetches_total", outcome="ok") - fetch0
            )
            decrypts = await agent.metric("secrets_agent_decrypts_total", outcome="ok") - dec0
        await core.aclose()
        if dest is not None:
            dest.unlink(missing_ok=True)
        return {
            "socket": socket_lat,
            "file": file_lat,
            "fetches": fetches,
            "decrypts": decrypts,
            "rotations": rotations,
        }


def report(label: str, result: dict[str, Any]) -> None:
    print(summary(f"{label}: to socket", result["socket"]))
    if result["file"]:
        print(summary(f"{label}: to rendered file", result["file"]))
    n = result["rotations"]
    print(
        f"{label}: fetches {result['fetches']:.0f} ({result['fetches'] / n:.2f}/rotation), "
        f"decrypts {result['decrypts']:.0f} ({result['decrypts'] / n:.2f}/rotation)"
    )


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rotations", type=int, default=100)
    parser.add_argument("--poll-rotations", type=int, default=10)
    parser.add_argument("--poll-interval", default="1s")
    parser.add_argument("--store", choices=["file", "etcd"], default="file")
    parser.add_argument("--etcd-endpoint", default="127.0.0.1:2379")
    parser.add_argument(
        "--render-dir",
        default="/dev/shm",
        help="tmpfs directory for the rendered file; 'none' to skip rendering",
    )
    args = parser.parse_args()
    store = None
    if args.store == "etcd":
        store = {
            "type": "etcd",
            "endpoints": [args.etcd_endpoint],
            "prefix": f"/bench-{uuid.uuid4().hex[:8]}",
        }
    render_root = None if args.render_dir == "none" else Path(args.render_dir)
    push = await run_mode(
        push=True,
        rotations=args.rotations,
        poll_interval="60s",
        store=store,
        render_root=render_root,
    )
    report(f"push ({args.store})", push)
    if args.poll_rotations:
        poll = await run_mode(
            push=False,
            rotations=args.poll_rotations,
            poll_interval=args.poll_interval,
            store=store,
            render_root=render_root,
        )
        report(f"poll every {args.poll_interval}", poll)
        ratio = percentile(poll["socket"], 50) / max(1e-9, percentile(push["socket"], 50))
        print(f"ratio: polling p50 / push p50 to socket = {ratio:.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
