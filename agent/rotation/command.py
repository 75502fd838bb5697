"""The ``command`` rotator: any target system, rotated by an executable of yours.

For each of the steps create, set and test the executable is run as::

    COMMAND [ARGS...] STEP SECRET_NAME TOKEN

* ``create``: stdin is the CURRENT value (empty if there is none); stdout is
  the new value (one trailing newline is stripped).
* ``set``, ``test``: stdin is the PENDING value; stdout is ignored.

Exit 0 is success. Exit 75 (``EX_TEMPFAIL``) means "transient, try again"
(:class:`~agent.errors.BackendUnavailable`); any other exit, a signal or the
timeout is :class:`RotationFailed`. The step must be idempotent: after a failure
it is run again with the same token and value.

The child gets a small environment (``PATH``, ``LANG``, the ``env`` parameter,
and ``SECRETS_AGENT_STEP``, ``SECRETS_AGENT_SECRET``, ``SECRETS_AGENT_TOKEN``,
``SECRETS_AGENT_CURRENT_VERSION``), never the agent's own (which may hold a PIN
or a token), and its own process group, killed whole on timeout. Its output
may hold the value, so it is never logged: a failure reports the exit status
only.

Parameters: ``command`` (a path, or a list: executable and leading
arguments; required), ``timeout`` (30s), ``env`` (a mapping of extra
variables).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import Mapping
from typing import Any

from agent.errors import BackendUnavailable, ConfigError
from agent.rotation.base import RotationContext, RotationFailed
from agent.rotation.params import as_duration, check_known

EX_TEMPFAIL = 75
#: The most a step may print on stdout (a value is small; anything larger is a bug).
MAX_OUTPUT = 1 << 20
#: How long a killed child's leftover output is drained before waiting for it.
_REAP_TIMEOUT = 5.0


class CommandRotator:
    """Runs one executable for the create, set and test steps."""

    def __init__(self, params: Mapping[str, Any] | None = None) -> None:
        params = dict(params or {})
        check_known(params, {"command", "timeout", "env"}, "command")
        command = params.get("command")
        if isinstance(command, str) and command:
            self.argv = [command]
        elif (
            isinstance(command, list) and command and all(isinstance(a, str) and a for a in command)
        ):
            self.argv = list(command)
        else:
            raise ConfigError("params.command: expected a path or a list [executable, args...]")
        exe = self.argv[0]
        if "/" in exe and not os.path.isabs(exe):
            # It would be looked up from the agent's working directory, not the
            # config file's (where every other relative path in the config goes).
            raise ConfigError(
                f"params.command: {exe!r} is a relative path; give an absolute path "
                "(or a bare name looked up on PATH)"
            )
        self.timeout = as_duration(params, "timeout", 30.0)
        env = params.get("env", {})
        if not isinstance(env, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in env.items()
        ):
            raise ConfigError("params.env: expected a mapping of names to text values")
        self.env = dict(env)

    def _environ(self, step: str, ctx: RotationContext) -> dict[str, str]:
        base = {k: os.environ[k] for k in ("PATH", "LANG", "LC_ALL") if k in os.environ}
        base.setdefault("PATH", "/usr/local/bin:/usr/bin:/bin")
        return {
            **base,
            **self.env,
            "SECRETS_AGENT_STEP": step,
            "SECRETS_AGENT_SECRET": ctx.name,
            "SECRETS_AGENT_TOKEN": ctx.token,
            "SECRETS_AGENT_CURRENT_VERSION": ctx.current_version or "",
        }

    async def _run(self, step: str, ctx: RotationContext, stdin: bytes) -> bytes:
        argv = [*self.argv, step, ctx.name, ctx.token]
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.DEVNULL,
                env=self._environ(step, ctx),
                start_new_session=True,
                close_fds=True,
            )
        except OSError as exc:
            raise RotationFailed(
                f"cannot run {self.argv[0]!r} for step {step}: {exc.strerror}"
            ) from None
        try:
            async with asyncio.timeout(self.timeout):
                out = await _collect(proc, stdin)
        except _TooMuchOutput:
            await _reap(proc)
            raise RotationFailed(
                f"{self.argv[0]!r} printed more than {MAX_OUTPUT} bytes at step {step}"
            ) from None
        except TimeoutError:
            await _reap(proc)
            raise RotationFailed(
                f"{self.argv[0]!r} did not finish step {step} within {self.timeout:g}s"
            ) from None
        except BaseException:
            with contextlib.suppress(Exception):
                await _reap(proc)
            raise
        code = proc.returncode
        if code == EX_TEMPFAIL:
            raise BackendUnavailable(f"{self.argv[0]!r} reported a transient failure at {step}")
        if code != 0:
            how = (
                f"was killed by signal {-code}"
                if code is not None and code < 0
                else (f"exited with status {code}")
            )
            raise RotationFailed(f"{self.argv[0]!r} {how} at step {step}")
        return out

    async def create(self, ctx: RotationContext) -> bytes:
        stdin = ctx.current.reveal() if ctx.current is not None else b""
        out = await self._run("create", ctx, stdin)
        value = out[:-1] if out.endswith(b"\n") else out
        if not value:
            raise RotationFailed(f"{self.argv[0]!r} printed no value at step create")
        return value

    async def set(self, ctx: RotationContext) -> None:
        await self._run("set", ctx, _pending(ctx))

    async def test(self, ctx: RotationContext) -> None:
        await self._run("test", ctx, _pending(ctx))

    async def aclose(self) -> None:
        return None


class _TooMuchOutput(Exception):
    """The child printed more than MAX_OUTPUT bytes."""


async def _collect(proc: asyncio.subprocess.Process, stdin: bytes) -> bytes:
    """Feed ``stdin``, read stdout up to MAX_OUTPUT bytes, and wait for the exit.

    The cap is checked while reading, so a child that prints without end is
    stopped at MAX_OUTPUT instead of growing the agent's memory until the
    timeout (``communicate`` buffers everything first).
    """
    assert proc.stdin is not None and proc.stdout is not None
    writer, reader = proc.stdin, proc.stdout

    async def feed() -> None:
        # A child may exit without reading its stdin. asyncio reports that as a
        # broken pipe; uvloop raises RuntimeError on the closed transport (seen
        # as "unexpected RuntimeError in the rotator" after the step had run).
        with contextlib.suppress(BrokenPipeError, ConnectionResetError, RuntimeError):
            if stdin and not writer.is_closing():
                writer.write(stdin)
                await writer.drain()
        writer.close()

    feeder = asyncio.create_task(feed())
    chunks: list[bytes] = []
    size = 0
    try:
        while chunk := await reader.read(1 << 16):
            size += len(chunk)
            if size > MAX_OUTPUT:
                raise _TooMuchOutput
            chunks.append(chunk)
        await feeder
        await proc.wait()
    finally:
        if not feeder.done():
            feeder.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await feeder
        if not writer.is_closing():
            writer.close()
    return b"".join(chunks)


async def _reap(proc: asyncio.subprocess.Process) -> None:
    """Kill the child's process group, drain what it left in the pipe, and wait.

    asyncio's ``wait()`` returns only once stdout is closed too, and a reader
    that stopped reading a full pipe never sees its end: discard the rest first.
    """
    _kill_group(proc.pid)
    if proc.stdout is not None:
        with contextlib.suppress(TimeoutError, OSError):
            async with asyncio.timeout(_REAP_TIMEOUT):
                await _discard(proc.stdout)
    await proc.wait()


async def _discard(reader: asyncio.StreamReader) -> None:
    while await reader.read(1 << 16):
        pass


def _pending(ctx: RotationContext) -> bytes:
    if ctx.pending is None:
        raise RotationFailed("no pending value")
    return ctx.pending.reveal()


def _kill_group(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)
