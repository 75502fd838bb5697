"""Cold start: a whole agent process, from exec to ``/readyz`` 200, over N secrets.

For each N: populate a directory store, start ``python -m agent run``, poll
``/readyz`` every 5 ms with a raw socket, then wait for the agent to settle
(no refresh counted for ``--settle`` seconds, bounded) and read its metrics:
refreshes, unwraps (key-provider calls), store reads, RSS now and at its peak
(VmHWM). Stopped by pid.

    python -m bench.coldstart [--counts 1000,10000]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench._store import populate


def http_get(sock_path: str, path: str, timeout: float = 5.0) -> tuple[int, bytes]:
    """One HTTP/1.0 GET on a Unix socket (the server closes after answering)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(sock_path)
        s.sendall(f"GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n".encode())
        data = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


def metric_sum(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        head, _, value = line.rpartition(" ")
        if head.split("{")[0] != name:
            continue
        if all(f'{k}="{v}"' in head for k, v in labels.items()):
            total += float(value)
    return total


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM of ``pid`` in kB."""
    out = {}
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0])
    return out


def proc_cpu(pid: int) -> float:
    """User + system CPU seconds of ``pid`` so far."""
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cold_start(
    cfg: Path,
    sock: Path,
    *,
    settle: float,
    env: dict[str, str] | None = None,
    src: Path | None = None,
) -> dict[str, Any]:
    """Start the agent on ``cfg``; time exec to /readyz 200; settle; read metrics; stop.

    ``src``: run the agent package found in this directory (an older checkout,
    for a before/after comparison in the same run) instead of this one.
    """
    log = cfg.parent / "agent.log"
    with open(log, "wb") as fh:
        started = time.perf_counter()
        proc = subprocess.Popen(
            [sys.executable, "-m", "agent", "-c", str(cfg), "run"],
            stdout=fh,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={**os.environ, **(env or {})},
            cwd=str(src) if src is not None else None,
        )
    try:
        ready_s = None
        deadline = started + 300
        while time.perf_counter() < deadline and proc.poll() is None:
            with contextlib.suppress(OSError):
                status, _ = http_get(str(sock), "/readyz", timeout=10)
                if status == 200:
                    ready_s = time.perf_counter() - started
                    cpu_ready = proc_cpu(proc.pid)
                    break
            time.sleep(0.005)
        if ready_s is None:
            raise RuntimeError(f"agent not ready; log tail:\n{log.read_text()[-2000:]}")
        rss_ready = proc_status(proc.pid)
        # Settle: until the refresh count stops moving for `settle` seconds (bounded).
        last, still_since = -1.0, time.perf_counter()
        end = time.perf_counter() + max(30.0, settle * 10)
        text = ""
        while time.perf_counter() < end:
            _, body = http_get(str(sock), "/metrics", timeout=30)
            text = body.decode()
            n = metric_sum(text, "secrets_agent_refreshes_total")
            if n != last:
                last, still_since = n, time.perf_counter()
            elif time.perf_counter() - still_since >= settle:
                break
            time.sleep(0.25)
        mem = proc_status(proc.pid)
        return {
            "ready_s": ready_s,
            "cpu_ready_s": cpu_ready,
            "cpu_settled_s": proc_cpu(proc.pid),
            "refreshes": metric_sum(text, "secrets_agent_refreshes_total"),
            "unwraps": metric_sum(text, "secrets_agent_key_operations_total", operation="unwrap"),
            "store_reads": metric_sum(text, "secrets_agent_store_operations_total"),
            "cached": metric_sum(text, "secrets_agent_cache_secrets"),
            "rss_ready_mb": rss_ready.get("VmRSS", 0) / 1024,
            "rss_mb": mem.get("VmRSS", 0) / 1024,
            "rss_peak_mb": mem.get("VmHWM", 0) / 1024,
        }
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()


def run(counts: list[int], *, settle: float = 2.0, runs: int = 1) -> list[dict[str, Any]]:
    rows = []
    for count in counts:
        with tempfile.TemporaryDirectory(prefix="sa-cold-") as tmp:
            directory = Path(tmp)
            t0 = time.perf_counter()
            cfg = asyncio.run(populate(directory, count))
            gen_s = time.perf_counter() - t0
            for i in range(runs):
                row = cold_start(cfg, directory / "agent.sock", settle=settle)
                row.update(secrets=count, run=i, populate_s=gen_s)
                rows.append(row)
                print(
                    f"  cold start {count:>6}: ready {row['ready_s']:.2f}s, "
                    f"{row['refreshes']:.0f} refreshes, {row['unwraps']:.0f} unwraps, "
                    f"RSS {row['rss_mb']:.0f} MB (peak {row['rss_peak_mb']:.0f})",
                    flush=True,
                )
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--counts", default="1000,10000")
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--settle", type=float, default=2.0)
    args = parser.parse_args()
    rows = run([int(c) for c in args.counts.split(",")], settle=args.settle, runs=args.runs)
    print(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
