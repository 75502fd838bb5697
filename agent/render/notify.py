"""Tell the app a rendered file changed: a signal and/or a command, debounced.

After a change the notifier waits until ``wait.min`` has passed with no further
change, but never longer than ``wait.max`` after the first one, so a burst of
rotations gives one notification. A failing command is logged and counted; it
never stops the agent or blocks other templates (each template has its own
notifier task).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from collections.abc import Callable

from agent.aio import wait_event
from agent.config import OnChangeConfig, WaitConfig
from agent.metrics import Metrics
from agent.types import utcnow

log = logging.getLogger(__name__)


class Notifier:
    """Debounced notification for one template."""

    def __init__(
        self,
        cfg: OnChangeConfig | None,
        wait: WaitConfig,
        *,
        where: str,
        metrics: Metrics,
        child_pid: Callable[[], int | None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.cfg = cfg
        self.wait = wait
        self.where = where
        self.metrics = metrics
        self.child_pid = child_pid
        self.clock = clock
        self.sent = 0
        self.last_sent: str | None = None  # ISO time of the last notification
        self._changed = asyncio.Event()
        self._last_change = 0.0

    def changed(self) -> None:
        """A rendered file changed: schedule one notification."""
        if self.cfg is None:
            return
        self._last_change = self.clock()
        self._changed.set()

    async def run(self) -> None:
        """Send debounced notifications until cancelled."""
        while True:
            await self._changed.wait()
            first = self.clock()
            while True:
                self._changed.clear()
                deadline = min(self._last_change + self.wait.min, first + self.wait.max)
                delay = deadline - self.clock()
                if delay <= 0:
                    break
                await wait_event(self._changed, delay)
            self._changed.clear()
            await self.fire()

    async def fire(self) -> None:
        """Signal and/or run the command now."""
        cfg = self.cfg
        if cfg is None:
            return
        self.sent += 1
        self.last_sent = utcnow().isoformat()
        if cfg.signal is not None:
            self._signal(cfg)
        if cfg.command is not None:
            await self._command(cfg.command, limit=cfg.timeout)

    def _target_pid(self, cfg: OnChangeConfig) -> int | None:
        if cfg.pid is not None:
            return cfg.pid
        if cfg.pid_file is not None:
            try:
                return int(cfg.pid_file.read_text().strip())
            except (OSError, ValueError) as exc:
                log.warning("%s: cannot read pid file %s: %s", self.where, cfg.pid_file, exc)
                return None
        return self.child_pid() if self.child_pid is not None else None

    def _signal(self, cfg: OnChangeConfig) -> None:
        assert cfg.signal is not None
        pid = self._target_pid(cfg)
        if pid is None or pid <= 0:
            self.metrics.notifications.labels("signal", "no_target").inc()
            log.warning("%s: no process to send %s to", self.where, cfg.signal)
            return
        try:
            os.kill(pid, signal.Signals[cfg.signal])
        except OSError as exc:
            self.metrics.notifications.labels("signal", "error").inc()
            log.warning("%s: %s to pid %d failed: %s", self.where, cfg.signal, pid, exc.strerror)
            return
        self.metrics.notifications.labels("signal", "ok").inc()
        log.info("%s changed: sent %s to pid %d", self.where, cfg.signal, pid)

    async def _command(self, argv: list[str], *, limit: float) -> None:
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.DEVNULL,
            )
        except OSError as exc:
            self.metrics.notifications.labels("command", "error").inc()
            log.warning("%s: cannot run %s: %s", self.where, argv[0], exc.strerror)
            return
        try:
            # asyncio.timeout, not wait_for: wait_for can lose a shutdown's cancel
            # when the command exits at that moment (see agent/aio.py).
            async with asyncio.timeout(limit):
                code = await proc.wait()
        except TimeoutError:
            await _kill(proc)
            self.metrics.notifications.labels("command", "timeout").inc()
            log.warning("%s: %s timed out after %.0fs and was killed", self.where, argv[0], limit)
            return
        except asyncio.CancelledError:  # shutdown or reload: leave no process behind
            await _kill(proc)
            raise
        outcome = "ok" if code == 0 else "error"
        self.metrics.notifications.labels("command", outcome).inc()
        level = logging.INFO if code == 0 else logging.WARNING
        log.log(level, "%s changed: %s exited %d", self.where, argv[0], code)


async def _kill(proc: asyncio.subprocess.Process) -> None:
    with contextlib.suppress(ProcessLookupError):
        proc.kill()
    await proc.wait()
