"""Benchmark helpers: run a real agent process on a temp config and read it."""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import aiohttp
import yaml


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100) by nearest rank."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    k = max(0, min(len(ordered) - 1, round(q / 100 * len(ordered) + 0.5) - 1))
    return ordered[k]


def summary(label: str, values_s: Sequence[float]) -> str:
    ms = [v * 1000 for v in values_s]
    return (
        f"{label:<28} n={len(ms):<4} p50={percentile(ms, 50):8.2f} ms  "
        f"p90={percentile(ms, 90):8.2f} ms  p99={percentile(ms, 99):8.2f} ms  "
        f"max={max(ms):8.2f} ms"
    )


def init_dir(directory: Path, overrides: dict[str, Any]) -> Path:
    """``secrets-agent init`` into ``directory``, then merge ``overrides`` into the config."""
    from agent.cli import main

    with contextlib.redirect_stdout(io.StringIO()):
        code = main(["init", "--dir", str(directory)])
    if code != 0:
        raise RuntimeError("init failed")
    cfg = directory / "agent.yaml"
    doc = yaml.safe_load(cfg.read_text())
    doc.update(overrides)
    cfg.write_text(yaml.safe_dump(doc))
    return cfg


class AgentProcess:
    """``python -m agent -c CFG run`` as a child; stopped by pid."""

    def __init__(self, config: Path, socket: Path) -> None:
        self.config = config
        self.socket = socket
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = config.parent / "agent.log"

    async def __aenter__(self) -> AgentProcess:
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "agent", "-c", str(self.config), "run"],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.session = aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=str(self.socket)))
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with contextlib.suppress(aiohttp.ClientError, OSError):
                async with self.session.get("http://localhost/readyz") as resp:
                    if resp.status == 200:
                        return self
            if self.proc.poll() is not None:
                break
            await asyncio.sleep(0.05)
        await self.__aexit__()
        raise RuntimeError(f"agent did not become ready; log:\n{self.log.read_text()[-2000:]}")

    async def __aexit__(self, *exc: object) -> None:
        await self.session.close()
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait()

    async def get_raw(self, name: str) -> bytes | None:
        async with self.session.get(
            f"http://localhost/v1/secrets/{name}", params={"format": "raw"}
        ) as resp:
            return await resp.read() if resp.status == 200 else None

    async def metric(self, name: str, **labels: str) -> float:
        """Sum of the samples of ``name`` whose labels include ``labels``."""
        async with self.session.get("http://localhost/metrics") as resp:
            text = await resp.text()
        total = 0.0
        for line in text.splitlines():
            if not line.startswith(name):
                continue
            head, _, value = line.rpartition(" ")
            if head.split("{")[0] != name:
                continue
            if all(f'{k}="{v}"' in head for k, v in labels.items()):
                total += float(value)
        return total
