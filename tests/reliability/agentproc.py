"""An agent in its own process (for descriptor limits, RSS and fd counts), and raw HTTP.

The agent runs ``python -m agent run`` from an :class:`~tests.agentenv.AgentEnv`
directory, with an optional ``RLIMIT_NOFILE``, its stderr in a file. Raw
requests go over plain sockets so a test can send what no HTTP client would.
"""

from __future__ import annotations

import contextlib
import os
import resource
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from tests.agentenv import AgentEnv


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def raw_unix(path: Path, data: bytes, *, timeout: float = 5.0) -> bytes:
    """Send ``data`` on a new Unix-socket connection; return all bytes until EOF.

    Requests that should be answered must ask for ``Connection: close``.
    """
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(str(path))
        return _exchange(s, data)


def raw_tcp(port: int, data: bytes, *, timeout: float = 5.0) -> bytes:
    """Send ``data`` on a new TCP connection to 127.0.0.1; return all bytes until EOF."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        return _exchange(s, data)


def _exchange(s: socket.socket, data: bytes) -> bytes:
    # No half-close: aiohttp drops a connection at EOF before it answers.
    s.sendall(data)
    out = b""
    with contextlib.suppress(TimeoutError, ConnectionResetError):
        while chunk := s.recv(65536):
            out += chunk
    return out


def status_of(answer: bytes) -> int:
    """The status code of a raw HTTP answer (0 if there is none)."""
    parts = answer.split(b" ", 2)
    return int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0


def proc_rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def proc_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


class AgentProcess:
    """``secrets-agent run`` as a child process; stopped (SIGTERM, then SIGKILL) by its pid."""

    def __init__(self, env: AgentEnv, *, nofile: int | None = None) -> None:
        self.env = env
        self.nofile = nofile
        self.log_path = env.dir / "agent.stderr"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, *, timeout: float = 30.0) -> None:
        limit = self.nofile

        def preexec() -> None:
            if limit is not None:
                resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))

        with open(self.log_path, "wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "agent", "-c", str(self.env.config_path), "run"],
                stdout=subprocess.DEVNULL,
                stderr=err,
                preexec_fn=preexec,
                cwd=str(self.env.dir),
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"the agent exited: {self.log()[-2000:]}")
            answer = b""
            with contextlib.suppress(OSError):
                answer = raw_unix(
                    self.env.socket, b"GET /readyz HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
                )
            if status_of(answer) == 200:
                return
            time.sleep(0.05)
        raise AssertionError(f"the agent did not become ready: {self.log()[-2000:]}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self) -> int:
        """SIGTERM, wait (bounded), SIGKILL if needed; return the exit code."""
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                return self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
        return self.proc.wait(10)


@contextlib.contextmanager
def agent_process(env: AgentEnv, *, nofile: int | None = None) -> Iterator[AgentProcess]:
    agent = AgentProcess(env, nofile=nofile)
    agent.start()
    try:
        yield agent
    finally:
        agent.stop()


async def araw(data: bytes, *, port: int | None = None, path: Path | None = None) -> bytes:
    """:func:`raw_tcp` / :func:`raw_unix` for tests whose agent runs in the same loop."""
    import asyncio

    if path is not None:
        reader, writer = await asyncio.open_unix_connection(str(path))
    else:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        return await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
