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

Rotation mode (``--mode rotation``): agent A rotates the secret on a schedule
(``every: 1s``, the ``random`` rotator); agent B, another process on the same
store, serves and renders it. For each rotation it measures the time from A's
committed finish step (the time of A's ``rotated`` audit record) until B's
socket serves the new version and until B's rendered file holds it.

    python bench/propagation.py --mode rotation [--rotations 60] [--store file|etcd]

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
#: Rotation mode polls agent B's socket this often (each poll is a full request).
POLL = 0.002


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
    render_root: Path | None,
) -> dict[str, Any]:
    from agent.config import load_config
    from agent.core import Core

    with tempfile.TemporaryDirectory(prefix="sa-bench-") as tmp:
        directory = Path(tmp)
        dest = render_root / f"{uuid.uuid4().hex[:8]}-value" if render_root is not None else None
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


async def run_rotation_mode(
    *, rotations: int, store: dict[str, Any] | None, render_root: Path | None
) -> dict[str, Any]:
    """A rotates every second; B (same store) serves and renders; time A's commit to B."""
    from agent.config import load_config
    from agent.core import Core

    with tempfile.TemporaryDirectory(prefix="sa-rot-") as tmp:
        dir_a, dir_b = Path(tmp) / "a", Path(tmp) / "b"
        dir_a.mkdir()
        dir_b.mkdir()
        rule = {"secret": NAME, "every": "1s", "rotator": "random", "params": {"length": 32}}
        store_cfg = store or {"type": "file", "path": str(dir_a / "store")}
        cfg_a = init_dir(
            dir_a,
            {
                "rotation": [rule],
                "secrets": [NAME],
                "store": store_cfg,
                "audit": {"path": str(dir_a / "audit.log")},  # the commit times are read here
                "listen": {"socket": str(dir_a / "agent.sock")},
            },
        )
        keys = {"local": {"type": "local", "keyring": str(dir_a / "keyring.json")}}
        dest = render_root / f"{uuid.uuid4().hex[:8]}-rotated" if render_root else None
        overrides_b: dict[str, Any] = {
            "listen": {"socket": str(dir_b / "agent.sock")},
            "store": store_cfg,
            "keys": keys,
            "secrets": [NAME],
            "refresh": {"watch": True, "interval": "60s"},
        }
        if dest is not None:
            overrides_b["templates"] = [{"destination": str(dest), "secret": NAME, "format": "raw"}]
        cfg_b = init_dir(dir_b, overrides_b)
        core = Core.build(load_config(cfg_a))
        await core.writer().put(NAME, b"initial")
        await core.aclose()
        audit_a = dir_a / "audit.log"
        socket_lat: list[float] = []
        file_lat: list[float] = []
        seen: set[str] = set()
        no_audit = file_missed = 0
        async with (
            AgentProcess(cfg_b, load_config(cfg_b).listen.socket) as agent_b,
            AgentProcess(cfg_a, load_config(cfg_a).listen.socket),
        ):
            deadline = time.monotonic() + rotations * 1.5 + 30
            while len(socket_lat) < rotations and time.monotonic() < deadline:
                async with agent_b.session.get(f"http://localhost/v1/secrets/{NAME}") as resp:
                    doc = await resp.json() if resp.status == 200 else {}
                version = doc.get("version_id")
                t_sock = time.time()
                if not version or version in seen or doc.get("value") == "initial":
                    await asyncio.sleep(POLL)
                    continue
                seen.add(version)
                value = str(doc["value"]).encode()
                t_file: float | None = None
                while dest is not None and time.time() < t_sock + TIMEOUT:
                    try:
                        if dest.read_bytes() == value:
                            t_file = time.time()
                            break
                    except OSError:
                        pass
                    await asyncio.sleep(0.0005)
                committed = _rotated_at(audit_a, version)
                if committed is None:
                    await asyncio.sleep(0.05)
                    committed = _rotated_at(audit_a, version)
                if committed is None:
                    no_audit += 1  # no 'rotated' record found for it: not timed
                    continue
                socket_lat.append(max(0.0, t_sock - committed))
                if t_file is not None:
                    file_lat.append(max(0.0, t_file - committed))
                elif dest is not None:
                    file_missed += 1  # never rendered within TIMEOUT: a miss, not a time
            failures = await agent_b.metric("secrets_agent_refreshes_total", outcome="error")
        if not socket_lat:
            raise RuntimeError("no rotation observed; is agent A rotating? see its agent.log")
        if dest is not None:
            dest.unlink(missing_ok=True)
        return {
            "socket": socket_lat,
            "file": file_lat if dest is not None else [],
            "rotations": len(socket_lat),
            "refresh_errors": failures,
            "untimed": no_audit,
            "file_missed": file_missed,
        }


def _rotated_at(audit: Path, version: str) -> float | None:
    """Wall-clock time of agent A's ``rotated`` record for ``version``."""
    import json
    from datetime import datetime

    try:
        lines = audit.read_text().splitlines()
    except OSError:
        return None
    for line in reversed(lines):
        rec = json.loads(line)
        if rec.get("event") == "rotated" and rec.get("version") == version:
            return datetime.fromisoformat(rec["time"].replace("Z", "+00:00")).timestamp()
    return None


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
    parser.add_argument("--mode", choices=["put", "rotation"], default="put")
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
    if args.mode == "rotation":
        result = await run_rotation_mode(
            rotations=args.rotations, store=store, render_root=render_root
        )
        print(summary(f"rotation in A ({args.store}) -> B socket", result["socket"]))
        if result["file"]:
            print(summary(f"rotation in A ({args.store}) -> B file", result["file"]))
        print(
            f"agent B refresh errors: {result['refresh_errors']:.0f}; rotations seen but not "
            f"timed (no audit record): {result['untimed']}; rendered file missed "
            f"(not written within {TIMEOUT:g} s): {result['file_missed']}"
        )
        return 0
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
