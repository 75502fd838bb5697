"""The audit log: one JSON line per event, each line chained to the one before.

Every line carries ``seq`` (1, 2, 3...) and ``prev``, the SHA-256 of the
previous line's bytes (``"0" * 64`` for the very first line). So editing,
removing or reordering lines breaks the chain at the next line, and
``secrets-agent audit verify`` finds it. What the chain cannot show: lines cut
from the *end* of the log, or a log rewritten from scratch by someone who can
write the file (see ``docs/security.md``: ship it off the host to anchor it).

A record names the event, the caller (uid/gid/pid/exe, or the *name* of the
TCP token), the secret, version and stage, the outcome and a reason; never a
value, never a token.

Writing (issues 11 and 13):

* **Group commit.** :meth:`AuditLog.record` only queues the record. The
  writer task (:meth:`AuditLog.run`, owned by the daemon) writes everything
  queued with one ``write`` per batch; a read awaits :meth:`AuditLog.sync`,
  so a value is released only once its record is in the kernel (a batch is
  what queued while the previous one was written: no timer, no added delay
  when idle). Without a running writer (the CLI, unit tests) each record is
  written at once.
* **Whole records or none.** A batch that fails part-way (disk full) is
  truncated back to where it started, so the file never holds a torn line and
  the chain continues from the last whole record when space returns; a torn
  tail left by a crash is cut on start. Records that were not written are
  counted, and a ``records_dropped`` record says how many once writing works
  again.
* **Refusals aggregated.** Denied, refused, not-found and failed requests are
  written once per (event, caller, secret, reason) per
  ``audit.aggregate_interval``; repeats are counted and written as one record
  with ``count`` at the end of the interval. So a flood of refused requests
  costs a few records, not a record each. Allowed reads are recorded one by
  one, unless ``audit.coalesce_reads`` is set.
* **fsync** of the file at most every ``audit.fsync_interval`` (in a worker
  thread, so the loop never waits for the disk), and at shutdown.
* **Rotation** by size (``audit.max_size``): the file is renamed to
  ``<name>.<seq of its first record>`` and the chain continues in a new file.
  External rotation (logrotate: rename or ``copytruncate``) works too.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from agent.auditfile import AuditFile, last_line
from agent.auditrecords import EVENTS, MAX_AGGREGATE_KEYS, Aggregates, Clock, chain, new_record
from agent.auditverify import GENESIS, Verdict, expand, line_hash, verify
from agent.config import AuditConfig
from agent.errors import BackendUnavailable, ConfigError
from agent.metrics import Metrics
from agent.ratelog import RateLimitedLog

if TYPE_CHECKING:
    from agent.server.peer import Caller

__all__ = [
    "EVENTS",
    "GENESIS",
    "MAX_AGGREGATE_KEYS",
    "AuditLog",
    "AuditUnavailable",
    "Auditor",
    "NullAudit",
    "Verdict",
    "expand",
    "last_line",
    "line_hash",
    "verify",
]

log = logging.getLogger(__name__)

_UNWRITABLE = "the audit log cannot be written; reads are refused until it can"


class AuditUnavailable(BackendUnavailable):
    """A record that had to be written (a read) could not be: the read is refused."""

    code = "audit_unavailable"


class Auditor(Protocol):
    """What the server, cache, renderer and daemon record events to."""

    def record(
        self,
        event: str,
        *,
        caller: Caller | None = None,
        secret: str | None = None,
        version: str | None = None,
        stage: str | None = None,
        outcome: str,
        reason: str | None = None,
        required: bool = False,
    ) -> None:
        """Queue one record (written at once when no writer task runs).

        Never raises for a failed write unless ``required``: then it raises
        :class:`AuditUnavailable` and the caller must not release the value.
        With a writer task running, a ``required`` record's fate is known
        only after :meth:`sync`.
        """

    async def sync(self) -> None:
        """Wait until every record queued so far is written.

        Raises:
            AuditUnavailable: the batch could not be written.
        """

    async def run(self) -> None:
        """The writer task: write batches until cancelled."""

    def status(self) -> dict[str, Any]:
        """A short summary for ``/v1/status`` (no record content)."""

    def reopen(self) -> None:
        """Open the file again after an external rotation (no-op when off)."""

    async def aclose(self) -> None:
        """Write what is queued, fsync and close; later records are dropped (or refused)."""


class NullAudit:
    """The audit log when ``audit.path`` is null: records go nowhere."""

    def record(
        self,
        event: str,
        *,
        caller: Caller | None = None,
        secret: str | None = None,
        version: str | None = None,
        stage: str | None = None,
        outcome: str,
        reason: str | None = None,
        required: bool = False,
    ) -> None:
        """Drop the record."""

    async def sync(self) -> None:
        return None

    async def run(self) -> None:
        return None

    def status(self) -> dict[str, Any]:
        return {"enabled": False}

    def reopen(self) -> None:
        return None

    async def aclose(self) -> None:
        return None


class AuditLog:
    """A hash-chained JSON-lines audit log on a file, or on stdout (``path=None``)."""

    def __init__(
        self,
        path: Path | None,
        *,
        metrics: Metrics | None = None,
        settings: AuditConfig | None = None,
        stream_fd: int = 1,
    ) -> None:
        self.path = path
        self.metrics = metrics
        self.settings = settings or AuditConfig()
        self._prev = GENESIS
        self._seq = 0
        self._closed = False
        self._queue: list[dict[str, Any]] = []
        self._waiter: asyncio.Future[None] | None = None
        self._wake: asyncio.Event | None = None
        self._running = False
        self._dirty = False
        self._syncing: asyncio.Future[None] | None = None
        self._last_fsync = time.monotonic()
        self._refusals = Aggregates(by_reason=True)
        self._reads = Aggregates(by_reason=False)
        self._dropped = 0
        self._clock = Clock()
        self._errors = RateLimitedLog(log, interval=30.0)
        self._counters: dict[str, Any] = {}
        self._tick_due = False
        self._tick_handle: asyncio.TimerHandle | None = None
        self._file = AuditFile(path, self._errors, stream_fd=stream_fd)
        if path is not None:
            self._resume(path)
            self._file.open(self._seq + 1)

    @classmethod
    def from_config(
        cls,
        cfg: AuditConfig,
        *,
        metrics: Metrics | None = None,
        base_dir: Path | None = None,
        stream_fd: int = 1,
    ) -> AuditLog | NullAudit:
        """The audit log ``audit.path`` asks for: a file, ``-`` (stdout) or off (null).

        A relative path is resolved against ``base_dir`` (the config's directory).
        ``stream_fd`` is where ``-`` writes: 1 for the agent, 2 for the CLI
        commands that audit (their stdout is their answer, for people and scripts).

        Raises:
            ConfigError: the file cannot be opened for appending (checked now,
                not at the first read).
        """
        if cfg.path is None:
            return NullAudit()
        if cfg.path == "-":
            return cls(None, metrics=metrics, settings=cfg, stream_fd=stream_fd)
        path = Path(cfg.path).expanduser()
        if not path.is_absolute() and base_dir is not None:
            path = base_dir / path
        return cls(path, metrics=metrics, settings=cfg)

    def _resume(self, path: Path) -> None:
        """Continue the chain from the last whole line of the file (cutting a torn tail)."""
        last = self._file.resume()
        if last is None:
            return
        self._prev = line_hash(last)
        try:
            seq = json.loads(last)["seq"]
            self._seq = seq if isinstance(seq, int) else 0
        except (ValueError, KeyError, TypeError):
            log.warning("the last line of audit log %s is not a record; chaining to it", path)

    def reopen(self) -> None:
        """Open the path again (after an external rotation; e.g. on SIGHUP)."""
        self._file.reopen(self._seq + 1)

    # ---------------------------------------------------------------------- records

    def record(
        self,
        event: str,
        *,
        caller: Caller | None = None,
        secret: str | None = None,
        version: str | None = None,
        stage: str | None = None,
        outcome: str,
        reason: str | None = None,
        required: bool = False,
    ) -> None:
        """Queue one record (see :class:`Auditor`)."""
        doc = new_record(
            event,
            caller=caller,
            secret=secret,
            version=version,
            stage=stage,
            outcome=outcome,
            reason=reason,
        )
        if caller is not None and not required and outcome != "allowed":
            if not self._refusals.first(doc):
                return
        elif required and self.settings.coalesce_reads > 0 and not self._reads.first(doc):
            return
        if self._closed:
            self._dropped += 1
            if required:
                raise AuditUnavailable("the audit log is closed; reads are refused")
            return
        self._queue.append(doc)
        if self._running:
            assert self._wake is not None
            self._wake.set()
            return
        if not self._flush() and required:
            raise AuditUnavailable(_UNWRITABLE)

    def _flush(self) -> bool:
        """Write every queued record in one write; whole batch or nothing. Resolves waiters."""
        waiter, self._waiter = self._waiter, None
        if not self._queue:
            if waiter is not None and not waiter.done():
                waiter.set_result(None)
            return True
        queue, self._queue = self._queue, []
        if self._dropped and not self._closed:
            gap = {"time": time.time(), "event": "records_dropped", "outcome": "lost"}
            gap.update(count=self._dropped, reason="the audit log could not be written")
            queue.insert(0, gap)
        if not self._running:
            try:
                self._file.follow_rotation(self._seq + 1)
            except (OSError, ConfigError) as exc:
                why = exc.message if isinstance(exc, ConfigError) else exc.strerror
                self._errors.error("reopen", "cannot reopen the audit log: %s", why)
        data, head = chain(queue, seq=self._seq, prev=self._prev, clock=self._clock)
        ok = self._file.append(data, next_seq=self._seq + 1, max_size=self.settings.max_size)
        if ok:
            self._prev = head
            self._seq += len(queue)
            self._dropped = 0
            self._dirty = True
            self._count(queue)
        else:
            self._dropped += sum(1 for d in queue if d["event"] != "records_dropped")
        if waiter is not None and not waiter.done():
            if ok:
                waiter.set_result(None)
            else:
                waiter.set_exception(AuditUnavailable(_UNWRITABLE))
        return ok

    def _count(self, queue: Iterable[dict[str, Any]]) -> None:
        if self.metrics is None:
            return
        for doc in queue:
            event = doc["event"]
            child = self._counters.get(event)
            if child is None:
                child = self._counters[event] = self.metrics.audit_events.labels(event)
            child.inc(doc.get("count", 1))

    # ----------------------------------------------------------------- writer task

    async def sync(self) -> None:
        """Wait until every queued record is written (see :class:`Auditor`)."""
        if not self._running or not self._queue:
            return
        if self._waiter is None:
            self._waiter = asyncio.get_running_loop().create_future()
        await asyncio.shield(self._waiter)

    async def run(self) -> None:
        """Write queued records in batches; aggregate, fsync and rotate on a 1 s tick."""
        loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        self._running = True
        self._tick_handle = loop.call_later(1.0, self._tick, loop)
        try:
            while True:
                await self._wake.wait()
                self._wake.clear()
                self._flush()
                self._housekeeping(loop)
        finally:
            if self._tick_handle is not None:
                self._tick_handle.cancel()
            self._running = False
            self._flush()

    def _tick(self, loop: asyncio.AbstractEventLoop) -> None:
        self._tick_due = True
        if self._wake is not None:
            self._wake.set()
        self._tick_handle = loop.call_later(1.0, self._tick, loop)

    def _housekeeping(self, loop: asyncio.AbstractEventLoop) -> None:
        if not self._tick_due:
            return
        self._tick_due = False
        now = time.monotonic()
        if now - self._refusals.started >= self.settings.aggregate_interval:
            self._refusals.started = now
            self._queue.extend(self._refusals.drain(self._clock))
        if 0 < self.settings.coalesce_reads <= now - self._reads.started:
            self._reads.started = now
            self._queue.extend(self._reads.drain(self._clock))
        if self._queue:
            self._flush()
        with contextlib.suppress(OSError, ConfigError):
            self._file.follow_rotation(self._seq + 1)
        idle = self._syncing is None or self._syncing.done()
        if idle and self._dirty and now - self._last_fsync >= self.settings.fsync_interval:
            self._start_fsync(loop)

    def _start_fsync(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._file.fd is None or self._file.fd == 1:
            return
        self._dirty = False
        self._last_fsync = time.monotonic()
        fd = os.dup(self._file.fd)

        def fsync() -> None:
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

        self._syncing = loop.run_in_executor(None, fsync)

    def status(self) -> dict[str, Any]:
        return {
            "enabled": True,
            "path": str(self.path) if self.path is not None else "-",
            "records": self._seq,
            "failing": self._file.failing,
            "dropped": self._dropped,
            "aggregated": self._refusals.repeats,
            "coalesced": self._reads.repeats,
        }

    @property
    def head(self) -> str:
        """The hash of the last record written: record it elsewhere to anchor the log."""
        return self._prev

    async def aclose(self) -> None:
        """Write the queue and the pending counts, fsync, close (never loses a queued record)."""
        if self._closed:
            return
        self._queue.extend(self._refusals.drain(self._clock))
        self._queue.extend(self._reads.drain(self._clock))
        self._flush()
        if self._syncing is not None:
            with contextlib.suppress(OSError):
                await self._syncing
        self._closed = True
        self._file.close()
