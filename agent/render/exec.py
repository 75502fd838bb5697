"""``secrets-agent exec``: run a command with secrets in its environment.

References look like ``secret://NAME[#KEY][?stage=STAGE]``. They are resolved
through a running agent's socket when one answers, else straight from the
store with the config's keys. Signals to this process are forwarded to the
child; the exit status is the child's (128 + signal if it was killed). With
``restart_on_change``, the referenced versions are checked every ``poll``
seconds and a change restarts the child gracefully: the stop signal, then
SIGKILL after ``stop_timeout``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import urllib.parse
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass

from agent.errors import BadRequest
from agent.types import normalize_stage, validate_name

log = logging.getLogger(__name__)
FORWARDED = (
    signal.SIGTERM,
    signal.SIGINT,
    signal.SIGHUP,
    signal.SIGUSR1,
    signal.SIGUSR2,
    signal.SIGQUIT,
)


@dataclass(frozen=True, slots=True)
class Reference:
    """``VAR=secret://NAME#KEY?stage=S`` parsed."""

    var: str
    name: str
    key: str | None = None
    stage: str | None = None


def parse_reference(spec: str) -> Reference:
    """Parse ``VAR=secret://NAME[#KEY][?stage=S]`` (raises BadRequest).

    The ``?stage=`` part may come before or after ``#KEY`` (a key holding
    ``?`` or ``#`` is written percent-encoded).
    """
    var, sep, ref = spec.partition("=")
    if not sep or not var.isidentifier() or not ref.startswith("secret://"):
        raise BadRequest(f"--env {spec.split('=')[0]!r}: expected VAR=secret://NAME[#KEY]")
    rest, _, fragment = ref.removeprefix("secret://").partition("#")
    key, _, key_query = fragment.partition("?")
    name, _, name_query = rest.partition("?")
    query = urllib.parse.parse_qs("&".join(q for q in (name_query, key_query) if q))
    unknown = set(query) - {"stage"}
    if unknown:
        raise BadRequest(f"--env {var}: unknown option(s) {sorted(unknown)}")
    stage = normalize_stage(query["stage"][-1]) if "stage" in query else None
    return Reference(var, validate_name(name), urllib.parse.unquote(key) or None, stage)


#: Resolves a reference to (value, version id).
Resolve = Callable[[Reference], Awaitable[tuple[str, str]]]
#: The current version id of each reference, by variable name, without fetching values.
Versions = Callable[[Sequence[Reference]], Awaitable[dict[str, str]]]
#: Signals after which the child is not started (again): the user wants it gone.
TERMINATING = frozenset({signal.SIGTERM, signal.SIGINT, signal.SIGQUIT})


def field_text(value: bytes, ref: Reference) -> str:
    """The environment value for ``ref`` from a secret's bytes (one key if asked)."""
    if ref.key is None:
        try:
            text = value.decode("utf-8")
        except UnicodeDecodeError:
            raise BadRequest(
                f"{ref.var}: secret {ref.name!r} is not UTF-8 text; render it to a file instead"
            ) from None
        if "\0" in text:
            raise BadRequest(f"{ref.var}: secret {ref.name!r} contains a NUL byte")
        return text
    try:
        doc = json.loads(value)
    except ValueError:
        raise BadRequest(f"{ref.var}: secret {ref.name!r} is not JSON") from None
    if not isinstance(doc, dict) or ref.key not in doc:
        raise BadRequest(f"{ref.var}: secret {ref.name!r} has no key {ref.key!r}")
    item = doc[ref.key]
    return item if isinstance(item, str) else json.dumps(item)


class ExecRunner:
    """Starts, watches, forwards signals to and restarts one child."""

    def __init__(
        self,
        argv: Sequence[str],
        refs: Sequence[Reference],
        resolve: Resolve,
        *,
        versions: Versions | None = None,
        restart_on_change: bool = False,
        stop_signal: int = signal.SIGTERM,
        stop_timeout: float = 10.0,
        poll: float = 1.0,
    ) -> None:
        self.argv = list(argv)
        self.refs = list(refs)
        self.resolve = resolve
        self.versions = versions
        self.restart_on_change = restart_on_change
        self.stop_signal = stop_signal
        self.stop_timeout = stop_timeout
        self.poll = poll
        self.proc: asyncio.subprocess.Process | None = None
        self.restarts = 0
        #: A terminating signal received: do not start or restart the child.
        self.stopping: int | None = None

    async def _environment(self) -> tuple[dict[str, str], dict[str, str]]:
        env = dict(os.environ)
        versions = {}
        for ref in self.refs:
            value, version = await self.resolve(ref)
            env[ref.var] = value
            versions[ref.var] = version
        return env, versions

    async def _versions(self) -> dict[str, str]:
        if self.versions is not None:
            return await self.versions(self.refs)
        return {ref.var: (await self.resolve(ref))[1] for ref in self.refs}

    async def run(self) -> int:
        """Run the child to completion; return its exit status."""
        loop = asyncio.get_running_loop()
        for sig in FORWARDED:
            loop.add_signal_handler(sig, self._forward, sig)
        try:
            while True:
                env, versions = await self._environment()
                if self.stopping is not None:
                    return 128 + self.stopping
                self.proc = await asyncio.create_subprocess_exec(*self.argv, env=env)
                if await self._supervise(versions) and self.stopping is None:
                    self.restarts += 1
                    continue
                code = self.proc.returncode
                assert code is not None
                return 128 - code if code < 0 else code
        finally:
            for sig in FORWARDED:
                loop.remove_signal_handler(sig)

    def _forward(self, sig: int) -> None:
        if sig in TERMINATING:
            self.stopping = sig
        if self.proc is not None and self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(sig)

    async def _supervise(self, versions: Mapping[str, str]) -> bool:
        """Wait for the child; return True if it was stopped for a restart."""
        assert self.proc is not None
        if not self.restart_on_change:
            await self.proc.wait()
            return False
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.poll):
                    await asyncio.shield(self.proc.wait())
            if self.proc.returncode is not None:
                return False
            if self.stopping is not None:  # the child is being stopped: no restart
                continue
            try:
                current = await self._versions()
            except Exception as exc:  # keep the child running while the source is down
                log.warning("exec: cannot check secret versions: %s", exc)
                continue
            if current != versions:
                log.info("exec: a secret changed; restarting the child")
                await self._stop()
                return True

    async def _stop(self) -> None:
        assert self.proc is not None
        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(self.stop_signal)
        try:
            async with asyncio.timeout(self.stop_timeout):
                await self.proc.wait()
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
            await self.proc.wait()
