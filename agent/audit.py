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
import re
import stat
import time
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Protocol

from agent import fsutil
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

#: The events the agent records (others are allowed, but must look like these).
EVENTS = frozenset(
    {
        "read",
        "denied",
        "not_found",
        "rendered",
        "rotated",
        "rotation_step",
        "key_created",
        "key_rotated",
        "config_reloaded",
        "envelope_refused",
        "records_dropped",
    }
)
_EVENT_RE = re.compile(r"[a-z][a-z_]{0,31}")
_TAIL_CHUNK = 4096
#: Distinct (event, caller, secret, reason) keys aggregated per interval; the
#: rest of the interval's refusals are counted in one overflow record.
MAX_AGGREGATE_KEYS = 256
_UNWRITABLE = "the audit log cannot be written; reads are refused until it can"
_OVERFLOW_REASON = "more distinct callers, names or reasons than aggregated one by one"


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


class _Clock:
    """UTC timestamps with millisecond precision; the seconds part is formatted once a second."""

    def __init__(self) -> None:
        self._sec = -1
        self._prefix = ""

    def format(self, t: float) -> str:
        sec = int(t)
        if sec != self._sec:
            self._sec = sec
            self._prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec))
        return f"{self._prefix}.{int((t - sec) * 1000):03d}Z"


def last_line(path: Path) -> bytes | None:
    """The last complete line of ``path`` (read from the end), or None if there is none."""
    with open(path, "rb") as fh:
        end = _last_newline(fh, fh.seek(0, os.SEEK_END))
        while end > 0:
            start = _last_newline(fh, end) + 1
            if start < end:
                fh.seek(start)
                return fh.read(end - start)
            end = start - 1
        return None


def _last_newline(fh: BinaryIO, end: int) -> int:
    """The offset of the last ``\\n`` in the open file, or -1."""
    pos = end
    while pos > 0:
        step = min(_TAIL_CHUNK, pos)
        pos -= step
        fh.seek(pos)
        chunk: bytes = fh.read(step)
        at = chunk.rfind(b"\n")
        if at >= 0:
            return pos + at
    return -1


class _Aggregate:
    """Repeats of one record within an interval: counted, written as one record."""

    __slots__ = ("count", "fields", "first")

    def __init__(self, fields: dict[str, Any], first: float) -> None:
        self.fields = fields
        self.first = first
        self.count = 0


class AuditLog:
    """A hash-chained JSON-lines audit log on a file, or on stdout (``path=None``)."""

    def __init__(
        self,
        path: Path | None,
        *,
        metrics: Metrics | None = None,
        settings: AuditConfig | None = None,
    ) -> None:
        self.path = path
        self.metrics = metrics
        self.settings = settings or AuditConfig()
        self._fd: int | None = None
        self._ident: tuple[int, int] | None = None
        self._size = 0
        self._file_first_seq = 1
        self._prev = GENESIS
        self._seq = 0
        self._failing = False
        self._closed = False
        self._queue: list[dict[str, Any]] = []
        self._waiter: asyncio.Future[None] | None = None
        self._wake: asyncio.Event | None = None
        self._running = False
        self._dirty = False
        self._syncing: asyncio.Future[None] | None = None
        self._last_fsync = time.monotonic()
        self._window_start = time.monotonic()
        self._refusals: dict[tuple[Any, ...], _Aggregate] = {}
        self._reads: dict[tuple[Any, ...], _Aggregate] = {}
        self._reads_start = time.monotonic()
        self._dropped = 0
        self._aggregated = 0
        self._coalesced = 0
        self._clock = _Clock()
        self._errors = RateLimitedLog(log, interval=30.0)
        self._counters: dict[str, Any] = {}
        self._tick_due = False
        self._tick_handle: asyncio.TimerHandle | None = None
        if path is None:
            self._fd = 1
        else:
            self._resume(path)
            self._open()

    @classmethod
    def from_config(
        cls, cfg: AuditConfig, *, metrics: Metrics | None = None, base_dir: Path | None = None
    ) -> AuditLog | NullAudit:
        """The audit log ``audit.path`` asks for: a file, ``-`` (stdout) or off (null).

        A relative path is resolved against ``base_dir`` (the config's directory).

        Raises:
            ConfigError: the file cannot be opened for appending (checked now,
                not at the first read).
        """
        if cfg.path is None:
            return NullAudit()
        if cfg.path == "-":
            return cls(None, metrics=metrics, settings=cfg)
        path = Path(cfg.path).expanduser()
        if not path.is_absolute() and base_dir is not None:
            path = base_dir / path
        return cls(path, metrics=metrics, settings=cfg)

    # ---------------------------------------------------------------- file handling

    def _resume(self, path: Path) -> None:
        """Continue the chain from the last whole line; cut a torn tail left by a crash."""
        try:
            self._cut_torn_tail(path)
            last = last_line(path)
        except FileNotFoundError:
            return
        except OSError as exc:
            raise ConfigError(f"cannot read {path}: {exc.strerror}", path="audit.path") from None
        if last is None:
            return
        self._prev = line_hash(last)
        try:
            seq = json.loads(last)["seq"]
            self._seq = seq if isinstance(seq, int) else 0
        except (ValueError, KeyError, TypeError):
            log.warning("the last line of audit log %s is not a record; chaining to it", path)

    @staticmethod
    def _cut_torn_tail(path: Path) -> None:
        with open(path, "r+b") as fh:
            end = fh.seek(0, os.SEEK_END)
            keep = _last_newline(fh, end) + 1
            if keep < end:
                fh.truncate(keep)
                log.warning(
                    "audit log %s ended with %d bytes of an incomplete record; removed them",
                    path,
                    end - keep,
                )

    def _open(self) -> None:
        assert self.path is not None
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW
        try:
            # The directory is checked (ours or root's, writable by no one else
            # unless sticky) and the log opened relative to it, no-follow.
            dir_fd = fsutil.open_checked_dir(
                self.path.parent, shared_ok=True, what="audit directory"
            )
        except fsutil.UnsafeDirectory as exc:
            raise ConfigError(exc.message, path="audit.path") from None
        except OSError as exc:
            raise ConfigError(
                f"cannot open audit log {self.path} (its directory): {exc.strerror}",
                path="audit.path",
            ) from None
        try:
            fd = os.open(self.path.name, flags, 0o600, dir_fd=dir_fd)
        except OSError as exc:
            raise ConfigError(
                f"cannot open audit log {self.path} for appending: {exc.strerror}",
                path="audit.path",
            ) from None
        finally:
            os.close(dir_fd)
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            os.close(fd)
            raise ConfigError(f"audit log {self.path} is not a regular file", path="audit.path")
        if st.st_uid not in (0, os.geteuid()):
            os.close(fd)
            raise ConfigError(
                f"audit log {fsutil.describe(self.path, st)} belongs to another user, who could "
                f"rewrite it. Fix: remove it, or chown {os.geteuid()} {self.path}",
                path="audit.path",
            )
        old, self._fd = self._fd, fd
        self._ident = (st.st_dev, st.st_ino)
        self._size = st.st_size
        if st.st_size == 0:
            self._file_first_seq = self._seq + 1
        if old is not None and old != 1:
            os.close(old)

    def _follow_rotation(self) -> None:
        """Reopen the path if the file we hold was renamed away or deleted."""
        if self.path is None or self._closed:
            return
        try:
            st = os.stat(self.path)
            current: tuple[int, int] | None = (st.st_dev, st.st_ino)
        except FileNotFoundError:
            current = None
        if current == self._ident:
            self._size = st.st_size  # copytruncate shrinks the file under us
        else:
            self._open()
            log.info("audit log %s was rotated; continuing the chain in a new file", self.path)

    def _rotate(self) -> None:
        """Size rotation: rename the file to ``<name>.<first seq>``; continue in a new one."""
        assert self.path is not None and self._fd is not None
        target = self.path.with_name(f"{self.path.name}.{self._file_first_seq:012d}")
        if target.exists():
            target = target.with_name(f"{target.name}.{int(time.time())}")
        os.fsync(self._fd)
        os.rename(self.path, target)
        self._open()
        self._file_first_seq = self._seq + 1
        log.info("audit log rotated to %s; the chain continues in %s", target.name, self.path)

    def reopen(self) -> None:
        """Open the path again (after an external rotation; e.g. on SIGHUP)."""
        if self.path is not None and not self._closed:
            try:
                self._open()
            except ConfigError as exc:
                self._errors.error("reopen", "cannot reopen the audit log: %s", exc.message)

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
        if not _EVENT_RE.fullmatch(event):
            raise ValueError(f"audit event names are short snake_case words, got {event!r}")
        now = time.time()
        doc: dict[str, Any] = {"time": now, "event": event, "outcome": outcome}
        if caller is not None:
            doc["caller"] = caller.describe()
        if secret is not None:
            doc["secret"] = secret
        if version is not None:
            doc["version"] = version
        if stage is not None:
            doc["stage"] = stage
        if reason is not None:
            doc["reason"] = reason
        if caller is not None and not required and outcome != "allowed":
            if not self._aggregate(self._refusals, doc, reason_key=True):
                return
        elif (
            required
            and self.settings.coalesce_reads > 0
            and not self._aggregate(self._reads, doc, reason_key=False)
        ):
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

    def _aggregate(
        self, table: dict[tuple[Any, ...], _Aggregate], doc: dict[str, Any], *, reason_key: bool
    ) -> bool:
        """Whether ``doc`` is written now (first of its key); repeats are only counted."""
        caller = json.dumps(doc.get("caller"), sort_keys=True)
        key: tuple[Any, ...] = (
            doc["event"],
            doc["outcome"],
            caller,
            doc.get("secret"),
            doc.get("version"),
            doc.get("stage"),
            doc.get("reason") if reason_key else None,
        )
        entry = table.get(key)
        if entry is None and len(table) >= MAX_AGGREGATE_KEYS:
            key = (doc["event"], "*overflow*")
            entry = table.get(key)
            if entry is None:
                fields = {"event": doc["event"], "outcome": doc["outcome"]}
                fields["reason"] = _OVERFLOW_REASON
                entry = table[key] = _Aggregate(fields, doc["time"])
            entry.count += 1
            return False
        if entry is None:
            fields = {k: v for k, v in doc.items() if k != "time"}
            table[key] = _Aggregate(fields, doc["time"])
            return True
        entry.count += 1
        if table is self._reads:
            self._coalesced += 1
        else:
            self._aggregated += 1
        return False

    def _drain(self, table: dict[tuple[Any, ...], _Aggregate]) -> None:
        """Queue one record with ``count`` per key repeated in the interval; start a new one."""
        now = time.time()
        for entry in table.values():
            if entry.count:
                doc = {"time": now, **entry.fields, "count": entry.count}
                doc["since"] = self._clock.format(entry.first)
                self._queue.append(doc)
        table.clear()

    def _line(self, doc: dict[str, Any], seq: int) -> bytes:
        out = {"seq": seq, "time": self._clock.format(doc["time"])}
        out.update((k, v) for k, v in doc.items() if k != "time")
        out["prev"] = self._prev
        return json.dumps(out, separators=(",", ":"), ensure_ascii=True).encode()

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
                self._follow_rotation()
            except (OSError, ConfigError) as exc:
                why = exc.message if isinstance(exc, ConfigError) else exc.strerror
                self._errors.error("reopen", "cannot reopen the audit log: %s", why)
        prev, seq = self._prev, self._seq
        lines = []
        for doc in queue:
            seq += 1
            line = self._line(doc, seq)
            lines.append(line)
            self._prev = line_hash(line)
        ok = self._write(b"\n".join(lines) + b"\n")
        if ok:
            self._seq = seq
            self._dropped = 0
            self._count(queue)
        else:
            self._prev = prev
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

    def _write(self, data: bytes) -> bool:
        """Append ``data``; on failure truncate back to where it started."""
        if self._closed or self._fd is None:
            return False
        start = self._size
        try:
            if (
                self.path is not None
                and self.settings.max_size is not None
                and start > 0
                and start + len(data) > self.settings.max_size
            ):
                self._rotate()
                start = self._size
            view = memoryview(data)
            while view:
                view = view[os.write(self._fd, view) :]
        except (OSError, ConfigError) as exc:
            self._truncate_back(start)
            reason = exc.strerror if isinstance(exc, OSError) else exc.message
            self._errors.error(
                "write", "cannot write the audit log %s: %s", self.path or "stdout", reason
            )
            self._failing = True
            return False
        self._size = start + len(data)
        self._dirty = True
        if self._failing:
            log.info("the audit log %s is writable again", self.path or "stdout")
            self._failing = False
        return True

    def _truncate_back(self, start: int) -> None:
        """Remove a partial batch: the file ends at ``start`` again (or at its last newline)."""
        if self.path is None or self._fd is None:
            return
        try:
            size = os.fstat(self._fd).st_size
            if size < start:  # truncated under us (copytruncate): keep whole lines only
                with open(self._fd, "rb", closefd=False) as fh:
                    start = _last_newline(fh, size) + 1
            if size != start:
                os.ftruncate(self._fd, start)
            self._size = start
        except OSError as exc:
            self._errors.error("truncate", "cannot truncate a torn audit record: %s", exc.strerror)

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
        if now - self._window_start >= self.settings.aggregate_interval:
            self._window_start = now
            self._drain(self._refusals)
        if 0 < self.settings.coalesce_reads <= now - self._reads_start:
            self._reads_start = now
            self._drain(self._reads)
        if self._queue:
            self._flush()
        with contextlib.suppress(OSError, ConfigError):
            self._follow_rotation()
        idle = self._syncing is None or self._syncing.done()
        if idle and self._dirty and now - self._last_fsync >= self.settings.fsync_interval:
            self._start_fsync(loop)

    def _start_fsync(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._fd is None or self._fd == 1:
            return
        self._dirty = False
        self._last_fsync = time.monotonic()
        fd = os.dup(self._fd)

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
            "failing": self._failing,
            "dropped": self._dropped,
            "aggregated": self._aggregated,
            "coalesced": self._coalesced,
        }

    @property
    def head(self) -> str:
        """The hash of the last record written: record it elsewhere to anchor the log."""
        return self._prev

    async def aclose(self) -> None:
        """Write the queue and the pending counts, fsync, close (never loses a queued record)."""
        if self._closed:
            return
        self._drain(self._refusals)
        self._drain(self._reads)
        self._flush()
        if self._syncing is not None:
            with contextlib.suppress(OSError):
                await self._syncing
        self._closed = True
        fd, self._fd = self._fd, None
        if fd is not None and fd != 1:
            with contextlib.suppress(OSError):
                os.fsync(fd)
            os.close(fd)
