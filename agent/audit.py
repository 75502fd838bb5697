"""The audit log: one JSON line per event, each line chained to the one before.

Every line carries ``seq`` (1, 2, 3...) and ``prev``, the SHA-256 of the
previous line's bytes (``"0" * 64`` for the very first line). So editing,
removing or reordering lines breaks the chain at the next line, and
``secrets-agent audit verify`` finds it. What the chain cannot show: lines cut
from the *end* of the log, or a log rewritten from scratch by someone who can
write the file (see ``docs/security.md``: ship it off the host to anchor it).

A record names the event, the caller (uid/gid/pid/exe, or the *name* of the
TCP token), the secret, version and stage, the outcome and a reason; never a
value, never a token. The file is opened ``O_APPEND`` (created ``0600``,
symlinks refused) and written one line per ``os.write``, so a record is in the
kernel's hands when :meth:`AuditLog.record` returns; a line is a few hundred
bytes, so writing inline does not stall the event loop. When the file is
renamed away (logrotate) the next record opens a new file at the same path
and continues the chain; ``copytruncate`` works too. On start the chain
continues from the last line of an existing file.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import stat
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from agent.config import AuditConfig
from agent.errors import BackendUnavailable, ConfigError
from agent.metrics import Metrics

if TYPE_CHECKING:
    from agent.server.peer import Caller

log = logging.getLogger(__name__)

#: ``prev`` of the first record of a new chain.
GENESIS = "0" * 64
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
    }
)
_EVENT_RE = re.compile(r"[a-z][a-z_]{0,31}")
_TAIL_CHUNK = 4096


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
        """Append one record.

        Never raises for a failed write unless ``required``: then it raises
        :class:`AuditUnavailable` and the caller must not release the value.
        """

    def status(self) -> dict[str, Any]:
        """A short summary for ``/v1/status`` (no record content)."""

    def reopen(self) -> None:
        """Open the file again after an external rotation (no-op when off)."""

    async def aclose(self) -> None:
        """Close the log; later records are dropped (or refused if required)."""


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

    def status(self) -> dict[str, Any]:
        return {"enabled": False}

    def reopen(self) -> None:
        return None

    async def aclose(self) -> None:
        return None


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def line_hash(line: bytes) -> str:
    """The chain hash of one record line (without its newline)."""
    return hashlib.sha256(line).hexdigest()


def last_line(path: Path) -> bytes | None:
    """The last non-empty line of ``path`` (read from the end), or None if empty."""
    with open(path, "rb") as fh:
        pos = fh.seek(0, os.SEEK_END)
        tail = b""
        while pos > 0:
            step = min(_TAIL_CHUNK, pos)
            pos -= step
            fh.seek(pos)
            tail = fh.read(step) + tail
            body = tail.rstrip(b"\n")
            cut = body.rfind(b"\n")
            if cut >= 0:
                return body[cut + 1 :]
        body = tail.rstrip(b"\n")
        return body or None


class AuditLog:
    """A hash-chained JSON-lines audit log on a file, or on stdout (``path=None``)."""

    def __init__(self, path: Path | None, *, metrics: Metrics | None = None) -> None:
        self.path = path
        self.metrics = metrics
        self._lock = threading.Lock()
        self._fd: int | None = None
        self._ident: tuple[int, int] | None = None
        self._prev = GENESIS
        self._seq = 0
        self._failing = False
        self._closed = False
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
            return cls(None, metrics=metrics)
        path = Path(cfg.path).expanduser()
        if not path.is_absolute() and base_dir is not None:
            path = base_dir / path
        return cls(path, metrics=metrics)

    # ---------------------------------------------------------------- file handling

    def _resume(self, path: Path) -> None:
        """Continue the chain from the last line of an existing log."""
        try:
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

    def _open(self) -> None:
        assert self.path is not None
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW
        try:
            fd = os.open(self.path, flags, 0o600)
        except OSError as exc:
            raise ConfigError(
                f"cannot open audit log {self.path} for appending: {exc.strerror}",
                path="audit.path",
            ) from None
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            os.close(fd)
            raise ConfigError(f"audit log {self.path} is not a regular file", path="audit.path")
        old, self._fd = self._fd, fd
        self._ident = (st.st_dev, st.st_ino)
        if old is not None and old != 1:
            os.close(old)

    def _follow_rotation(self) -> None:
        """Reopen the path if the file we hold was renamed away or deleted."""
        assert self.path is not None
        try:
            st = os.stat(self.path)
            current: tuple[int, int] | None = (st.st_dev, st.st_ino)
        except FileNotFoundError:
            current = None
        if current != self._ident:
            self._open()
            log.info("audit log %s was rotated; continuing the chain in a new file", self.path)

    def reopen(self) -> None:
        """Open the path again (after an external rotation; e.g. on SIGHUP)."""
        with self._lock:
            if self.path is not None and not self._closed:
                self._open()

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
        """Append one record (see :class:`Auditor`)."""
        if not _EVENT_RE.fullmatch(event):
            raise ValueError(f"audit event names are short snake_case words, got {event!r}")
        with self._lock:
            seq = self._seq + 1
            doc: dict[str, Any] = {"seq": seq, "time": _now(), "event": event, "outcome": outcome}
            if caller is not None:
                doc["caller"] = caller.describe()
            for key, value in (
                ("secret", secret),
                ("version", version),
                ("stage", stage),
                ("reason", reason),
            ):
                if value is not None:
                    doc[key] = value
            doc["prev"] = self._prev
            line = json.dumps(doc, separators=(",", ":"), ensure_ascii=True).encode()
            if not self._write(line + b"\n"):
                if required:
                    raise AuditUnavailable(
                        "the audit log cannot be written; reads are refused until it can"
                    )
                return
            self._prev = line_hash(line)
            self._seq = seq
        if self.metrics is not None:
            self.metrics.audit_events.labels(event).inc()

    def _write(self, data: bytes) -> bool:
        if self._closed or self._fd is None:
            return False
        try:
            if self.path is not None:
                self._follow_rotation()
            view = memoryview(data)
            while view:
                view = view[os.write(self._fd, view) :]
        except (OSError, ConfigError) as exc:
            if not self._failing:
                reason = exc.strerror if isinstance(exc, OSError) else exc.message
                log.error("cannot write the audit log %s: %s", self.path or "stdout", reason)
            self._failing = True
            return False
        if self._failing:
            log.info("the audit log %s is writable again", self.path or "stdout")
            self._failing = False
        return True

    def status(self) -> dict[str, Any]:
        return {
            "enabled": True,
            "path": str(self.path) if self.path is not None else "-",
            "records": self._seq,
            "failing": self._failing,
        }

    @property
    def head(self) -> str:
        """The hash of the last record written: record it elsewhere to anchor the log."""
        return self._prev

    async def aclose(self) -> None:
        with self._lock:
            self._closed = True
            fd, self._fd = self._fd, None
            if fd is not None and fd != 1:
                os.close(fd)


# --------------------------------------------------------------------------- verify


@dataclass(frozen=True, slots=True)
class Verdict:
    """The result of :func:`verify`: ``ok``, the record count, and the first break."""

    ok: bool
    records: int
    head: str
    file: str | None = None
    line: int | None = None
    reason: str | None = None


def _check(doc: object, prev: str | None, seq: int | None) -> str | None:
    """Why a parsed record does not continue the chain (None if it does)."""
    if not isinstance(doc, dict):
        return "not a JSON object"
    if not isinstance(doc.get("seq"), int) or not isinstance(doc.get("prev"), str):
        return "no 'seq' or 'prev' field: not an audit record"
    if not isinstance(doc.get("event"), str) or not isinstance(doc.get("outcome"), str):
        return "no 'event' or 'outcome' field: not an audit record"
    if seq is not None and doc["seq"] != seq + 1:
        if doc["seq"] > seq + 1:
            return f"seq {doc['seq']} follows {seq}: record(s) missing"
        return f"seq {doc['seq']} follows {seq}: records out of order or repeated"
    if prev is not None and doc["prev"] != prev:
        return "prev hash does not match the line before: it was edited, removed or reordered"
    return None


def verify(paths: Sequence[Path] | Iterable[Path]) -> Verdict:
    """Check the chain through ``paths`` (older files first; one file is common).

    The first record of the first file may continue a chain from an earlier
    file that is not given; every other link is checked.
    """
    prev: str | None = None
    seq: int | None = None
    records = 0
    for path in paths:
        with open(path, "rb") as fh:
            for number, raw in enumerate(fh, start=1):
                line = raw.rstrip(b"\n")
                try:
                    doc = json.loads(line)
                except ValueError:
                    doc = None
                why = _check(doc, prev, seq) if doc is not None else "not valid JSON"
                if why is not None:
                    return Verdict(False, records, prev or GENESIS, str(path), number, why)
                assert isinstance(doc, dict)
                prev, seq = line_hash(line), doc["seq"]
                records += 1
    return Verdict(True, records, prev or GENESIS)
