"""An agent on a temp directory, driven through the CLI and run in-process."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import io
import shutil
import sys
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from agent.cli import main
from agent.config import AgentConfig, load_config
from agent.daemon import Daemon


class AgentEnv:
    """A config dir made by ``secrets-agent init``, with helpers to write and serve."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.config_path = directory / "agent.yaml"
        self.socket = directory / "agent.sock"

    def configure(self, **overrides: Any) -> None:
        """Merge top-level sections into agent.yaml."""
        doc = yaml.safe_load(self.config_path.read_text())
        doc.update(overrides)
        self.config_path.write_text(yaml.safe_dump(doc))

    def config(self) -> AgentConfig:
        return load_config(self.config_path)

    def cli(self, *args: str, stdin: bytes | None = None) -> tuple[int, str, str]:
        """Run ``secrets-agent -c CFG ARGS`` in-process; return (code, stdout, stderr)."""
        out_bytes = io.BytesIO()
        out = io.TextIOWrapper(out_bytes, encoding="utf-8", write_through=True)
        err = io.StringIO()
        old_stdin = sys.stdin
        if stdin is not None:
            sys.stdin = io.TextIOWrapper(io.BytesIO(stdin))
        try:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                argv = ["-c", str(self.config_path), *args]
                try:
                    asyncio.get_running_loop()
                except RuntimeError:
                    code = main(argv)
                else:  # called from an async test: asyncio.run needs a thread of its own
                    with concurrent.futures.ThreadPoolExecutor(1) as pool:
                        code = pool.submit(main, argv).result()
        finally:
            sys.stdin = old_stdin
        out.flush()
        return code, out_bytes.getvalue().decode("utf-8", "replace"), err.getvalue()

    def put(self, name: str, value: str | bytes, *extra: str) -> str:
        data = value.encode() if isinstance(value, str) else value
        code, out, err = self.cli("put", name, *extra, stdin=data)
        assert code == 0, err
        return out.split("version ")[1].split()[0]

    @contextlib.asynccontextmanager
    async def running(self, config: AgentConfig | None = None) -> AsyncIterator[RunningAgent]:
        daemon = Daemon(config or self.config())
        task = asyncio.create_task(daemon.run())
        session = aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=str(self.socket)))
        try:
            running = RunningAgent(daemon, session)
            await running.wait_ready(task)
            yield running
        finally:
            daemon.shutdown.set()
            await session.close()
            await asyncio.wait_for(task, 15)


class RunningAgent:
    def __init__(self, daemon: Daemon, session: aiohttp.ClientSession) -> None:
        self.daemon = daemon
        self.session = session

    async def wait_ready(self, task: asyncio.Task[None], timeout: float = 15) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while loop.time() < deadline:
            if task.done():
                task.result()
                raise AssertionError("the agent exited before it was ready")
            with contextlib.suppress(aiohttp.ClientError, OSError):
                async with self.session.get("http://localhost/readyz") as resp:
                    if resp.status == 200:
                        return
            await asyncio.sleep(0.02)
        raise AssertionError("the agent did not become ready")

    async def get(self, path: str, **params: str) -> tuple[int, dict[str, str], bytes]:
        async with self.session.get(f"http://localhost{path}", params=params) as resp:
            return resp.status, dict(resp.headers), await resp.read()

    async def value(self, name: str, **params: str) -> bytes | None:
        status, _, body = await self.get(f"/v1/secrets/{name}", format="raw", **params)
        return body if status == 200 else None

    async def eventually(
        self, name: str, expected: bytes, timeout: float = 10, **params: str
    ) -> None:
        """Wait (bounded) until the agent serves ``expected`` for ``name``."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        last = None
        while loop.time() < deadline:
            last = await self.value(name, **params)
            if last == expected:
                return
            await asyncio.sleep(0.01)
        raise AssertionError(f"{name} did not become the expected value (last: {last!r})")


@contextlib.contextmanager
def agent_dir() -> Any:
    """A short temp dir (Unix socket paths must stay under 108 bytes), removed after."""
    directory = Path(tempfile.mkdtemp(prefix="sa", dir="/tmp"))
    try:
        code = main(["init", "--dir", str(directory)])
        assert code == 0
        env = AgentEnv(directory)
        # init's config puts the socket in the runtime dir and the audit log on
        # stdout; tests keep both in their own directory.
        env.configure(
            listen={"socket": "./agent.sock", "socket_mode": "0660"},
            audit={"path": "./audit.log"},
        )
        yield env
    finally:
        shutil.rmtree(directory, ignore_errors=True)
