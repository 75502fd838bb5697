"""A small keep-alive HTTP/1.1 load client over a Unix socket, one process per slice.

Each client process drives ``connections`` keep-alive connections with one
request in flight on each (a closed loop), for ``duration`` seconds, and
reports its request count, latencies and its own CPU time, so a run can show
that the client was not the bottleneck. Plain sockets and ``selectors``: an
aiohttp client would cost more CPU than the server it measures.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import selectors
import socket
import time
from dataclasses import dataclass
from typing import Any


@dataclass
class _Conn:
    sock: socket.socket
    buf: bytearray
    sent_at: float
    need: int  # bytes of the current response still unknown (-1: headers not complete)


def _request(path: str) -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n".encode()


def _body_length(head: bytes) -> int:
    for line in head.split(b"\r\n")[1:]:
        key, _, value = line.partition(b":")
        if key.strip().lower() == b"content-length":
            return int(value)
    raise ValueError("response without Content-Length")


def _worker(sock_path: str, path: str, connections: int, duration: float, out: Any) -> None:
    req = _request(path)
    sel = selectors.DefaultSelector()
    conns = []
    for _ in range(connections):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(sock_path)
        s.setblocking(False)
        c = _Conn(s, bytearray(), 0.0, -1)
        sel.register(s, selectors.EVENT_READ, c)
        conns.append(c)
    lat: list[float] = []
    statuses: dict[str, int] = {}
    cpu0 = time.process_time()
    start = time.perf_counter()
    end = start + duration
    for c in conns:
        c.sent_at = time.perf_counter()
        c.sock.send(req)
    while True:
        now = time.perf_counter()
        if now >= end:
            break
        for key, _ in sel.select(timeout=min(0.5, end - now)):
            c = key.data
            chunk = c.sock.recv(65536)
            if not chunk:
                raise RuntimeError("server closed the connection")
            c.buf += chunk
            while True:
                head_end = c.buf.find(b"\r\n\r\n")
                if head_end < 0:
                    break
                total = head_end + 4 + _body_length(bytes(c.buf[:head_end]))
                if len(c.buf) < total:
                    break
                status = c.buf[9:12].decode()
                statuses[status] = statuses.get(status, 0) + 1
                del c.buf[:total]
                t = time.perf_counter()
                lat.append(t - c.sent_at)
                c.sent_at = t
                c.sock.send(req)
    elapsed = time.perf_counter() - start
    cpu = time.process_time() - cpu0
    for c in conns:
        c.sock.close()
    out.put({"lat": lat, "elapsed": elapsed, "cpu": cpu, "statuses": statuses})


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0-100) by nearest rank."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    k = max(0, min(len(ordered) - 1, round(q / 100 * len(ordered) + 0.5) - 1))
    return ordered[k]


def run_load(
    sock_path: str,
    path: str,
    *,
    concurrency: int,
    duration: float,
    processes: int = 4,
    server_pid: int | None = None,
) -> dict[str, Any]:
    """``concurrency`` keep-alive connections over up to ``processes`` client processes.

    Returns requests per second, p50/p99 latency in ms, the clients' CPU use
    (seconds of CPU per second of wall time, summed over processes) and, if
    ``server_pid`` is given, the server's CPU use over the same window.
    """
    procs = max(1, min(processes, concurrency))
    per = [concurrency // procs + (1 if i < concurrency % procs else 0) for i in range(procs)]
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    server_cpu0 = _proc_cpu(server_pid) if server_pid else None
    wall0 = time.perf_counter()
    workers = [ctx.Process(target=_worker, args=(sock_path, path, n, duration, q)) for n in per]
    for w in workers:
        w.start()
    results = [q.get(timeout=duration + 30) for _ in workers]
    for w in workers:
        w.join(timeout=10)
    wall = time.perf_counter() - wall0
    server_cpu = (
        (_proc_cpu(server_pid) - server_cpu0) / wall
        if server_pid and server_cpu0 is not None
        else None
    )
    lat = [x for r in results for x in r["lat"]]
    statuses: dict[str, int] = {}
    for r in results:
        for k, v in r["statuses"].items():
            statuses[k] = statuses.get(k, 0) + v
    elapsed = max(r["elapsed"] for r in results)
    return {
        "concurrency": concurrency,
        "requests": len(lat),
        "rps": len(lat) / elapsed,
        "p50_ms": percentile(lat, 50) * 1000,
        "p99_ms": percentile(lat, 99) * 1000,
        "client_cpu": sum(r["cpu"] for r in results) / elapsed,
        "client_procs": procs,
        "server_cpu": server_cpu,
        "statuses": statuses,
    }


def _proc_cpu(pid: int) -> float:
    """User+system CPU seconds of ``pid`` so far, from /proc."""
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rpartition(")")[2].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks


if __name__ == "__main__":
    import sys

    print(
        json.dumps(
            run_load(
                sys.argv[1], sys.argv[2], concurrency=int(sys.argv[3]), duration=float(sys.argv[4])
            ),
            indent=1,
        )
    )
