"""One-for-one supervision of the daemon's long-lived parts (STYLE.md item 4).

A bare :class:`asyncio.TaskGroup` tears everything down when one child raises:
right at start-up, wrong while serving. Here each part (refresher, renderer,
config watch, key watch, rotation...) runs in its own loop: an unexpected
exception is logged once with its context (the exception type and the
traceback's frames, never its message, which could quote a value), counted in
``secrets_agent_part_restarts_total{part}``, and that part alone restarts after
a jittered exponential backoff while the others keep serving. A part that
returns normally is done and is not restarted (a one-shot start-up load, a
config watch with no file to watch). Cancellation (shutdown) is never caught.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
import traceback
from collections.abc import Callable, Coroutine, Iterable
from dataclasses import dataclass
from typing import Any

from agent.errors import AgentError
from agent.metrics import Metrics
from agent.ratelog import RateLimitedLog
from agent.refresh import Backoff
from agent.types import utcnow

log = logging.getLogger(__name__)

PartFactory = Callable[[], Coroutine[Any, Any, None]]


def part_name(factory: PartFactory) -> str:
    """A stable, bounded label for ``factory``: ``part_name`` if set, else from its name.

    ``KeyWatch.run`` -> ``key_watch``; ``RotationScheduler.run`` -> ``rotation_scheduler``;
    a plain function ``_watch_config`` -> ``watch_config``.
    """
    explicit = getattr(factory, "part_name", None)
    if isinstance(explicit, str) and explicit:
        return explicit
    qualname = getattr(factory, "__qualname__", None) or type(factory).__name__
    owner, _, method = qualname.rpartition(".")
    base = owner.rpartition(".")[2] if owner and method in ("run", "__call__") else method
    base = base or qualname
    return re.sub(r"(?<!^)(?=[A-Z])", "_", base.strip("_")).lower()


def error_kind(exc: BaseException) -> str:
    """The type name of ``exc`` (of its first leaf, for an exception group)."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return type(exc).__name__


def _context(exc: BaseException) -> str:
    """Where ``exc`` was raised: its frames, without its message (it may quote a value)."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    frames = traceback.extract_tb(exc.__traceback__)[-6:]
    # File, line and function only: a source line may hold a literal value.
    return "\n".join(f'  File "{f.filename}", line {f.lineno}, in {f.name}' for f in frames)


@dataclass(eq=False)
class Part:
    """One supervised part and what ``/v1/status`` shows of it."""

    name: str
    factory: PartFactory
    state: str = "starting"  # running | restarting | done | stopped
    restarts: int = 0
    last_error: str | None = None  # the exception type only
    last_error_at: str | None = None

    def status(self) -> dict[str, Any]:
        return {
            "part": self.name,
            "state": self.state,
            "restarts": self.restarts,
            "last_error": self.last_error,
            "last_error_at": self.last_error_at,
        }


class Supervisor:
    """Runs parts one-for-one: a failing part restarts with backoff, alone."""

    def __init__(
        self,
        *,
        metrics: Metrics,
        backoff_initial: float = 1.0,
        backoff_max: float = 60.0,
        jitter: float = 0.2,
        stable_after: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.metrics = metrics
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self.jitter = jitter
        #: A part that ran this long before failing starts its backoff afresh.
        self.stable_after = stable_after
        self.clock = clock
        self.parts: list[Part] = []
        self._quiet = RateLimitedLog(log, interval=300.0, clock=clock)
        self._stopping = False

    def add(self, factory: PartFactory, *, name: str | None = None) -> Part:
        """Register a part (before :meth:`run`); its name labels the restart metric."""
        part = Part(name or part_name(factory), factory)
        taken = {p.name for p in self.parts}
        n = 2
        while part.name in taken:  # two parts of one class: keep labels distinct
            part.name = f"{name or part_name(factory)}_{n}"
            n += 1
        self.parts.append(part)
        self.metrics.part_restarts.labels(part.name)  # export 0 from the start
        return part

    async def run(self, factories: Iterable[PartFactory] = ()) -> None:
        """Run every part until cancelled; returns early only if every part is done."""
        for factory in factories:
            self.add(factory)
        async with asyncio.TaskGroup() as tg:
            tasks = [
                tg.create_task(self._supervise(part), name=f"part:{part.name}")
                for part in self.parts
            ]
            try:
                if tasks:
                    await asyncio.wait(tasks)
            except asyncio.CancelledError:
                self._stopping = True  # seen by parts that fail while being cancelled
                raise

    async def _supervise(self, part: Part) -> None:
        backoff = Backoff(
            initial=self.backoff_initial, maximum=self.backoff_max, jitter=self.jitter
        )
        while True:
            started = self.clock()
            part.state = "running"
            try:
                await part.factory()
            except asyncio.CancelledError:
                part.state = "stopped"
                raise
            except Exception as exc:  # the point of a supervisor: any failure of one part
                if self._stopping:
                    # Shutdown arrived while the part failed: a TaskGroup then raises
                    # its ExceptionGroup, not CancelledError. Never swallow a cancel.
                    part.state = "stopped"
                    raise asyncio.CancelledError from exc
                if self.clock() - started >= self.stable_after:
                    backoff.reset()
                delay = backoff.next_delay()
                self._failed(part, exc, delay)
                part.state = "restarting"
                await asyncio.sleep(delay)
                continue
            part.state = "done"
            log.debug("part %r finished", part.name)
            return

    def _failed(self, part: Part, exc: Exception, delay: float) -> None:
        kind = error_kind(exc)
        part.restarts += 1
        part.last_error = kind
        part.last_error_at = utcnow().isoformat()
        self.metrics.part_restarts.labels(part.name).inc()
        # A domain error's message is written for logs (no values); anything else
        # is shown by type and frames only.
        detail = f": {exc.message}" if isinstance(exc, AgentError) else ""
        self._quiet.error(
            (part.name, kind),
            "part %r failed with %s%s; restarting it in %.1fs (restart %d), "
            "the other parts keep serving\n%s",
            part.name,
            kind,
            detail,
            delay,
            part.restarts,
            _context(exc),
        )

    def status(self) -> dict[str, Any]:
        """For ``/v1/status``: each part's state, restarts and last error kind."""
        return {"parts": [p.status() for p in self.parts]}
