"""The audit log's file: opened safely, appended whole records or none, rotated.

:class:`~agent.audit.AuditLog` decides what to write and when; this module
owns the file descriptor. It opens the log relative to a checked directory
(no-follow, ours or root's), continues after a crash from the last whole line,
appends a batch with one ``write`` and truncates back if that fails part-way,
rotates by size and follows an external rotation (rename or ``copytruncate``).
With ``path=None`` the log is stdout and most of this is skipped.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import stat
import time
from pathlib import Path
from typing import BinaryIO

from agent import fsutil
from agent.errors import ConfigError
from agent.ratelog import RateLimitedLog

# The audit log's own logger: operators filter on it, whichever module logs.
log = logging.getLogger("agent.audit")

_TAIL_CHUNK = 4096


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


class AuditFile:
    """The open audit log file (or stdout), appended to in whole batches.

    ``next_seq`` arguments are the ``seq`` the next record written will carry:
    a rotated file is named after the first record it holds.
    """

    def __init__(self, path: Path | None, errors: RateLimitedLog, *, stream_fd: int = 1) -> None:
        self.path = path
        #: The standard stream written with ``path=None`` (never closed here).
        self._stream = stream_fd
        self.fd: int | None = stream_fd if path is None else None
        #: Whether the last write failed (reported in ``/v1/status``).
        self.failing = False
        self._errors = errors
        self._ident: tuple[int, int] | None = None
        self._size = 0
        self._first_seq = 1

    def resume(self) -> bytes | None:
        """The last whole line of the existing log (None if none); a torn tail is cut first.

        Raises:
            ConfigError: the file exists but cannot be read.
        """
        assert self.path is not None
        try:
            self._cut_torn_tail(self.path)
            return last_line(self.path)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise ConfigError(
                f"cannot read {self.path}: {exc.strerror}", path="audit.path"
            ) from None

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

    def open(self, next_seq: int) -> None:
        """Open the path for appending, in place of the file held so far.

        Raises:
            ConfigError: the directory is unsafe, or the file cannot be opened,
                is not a regular file or belongs to another user.
        """
        assert self.path is not None
        flags = os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW
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
                f"cannot open audit log {self.path} (its directory): {exc.strerror}"
                + _denied(exc, self.path),
                path="audit.path",
            ) from None
        try:
            fd = os.open(self.path.name, flags, 0o600, dir_fd=dir_fd)
        except OSError as exc:
            raise ConfigError(
                f"cannot open audit log {self.path} for appending: {exc.strerror}"
                + _denied(exc, self.path),
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
        old, self.fd = self.fd, fd
        self._ident = (st.st_dev, st.st_ino)
        self._size = st.st_size
        # The name a size rotation gives this file: the seq of its first record
        # (one already there, after a restart), else the next one written.
        self._first_seq = (_first_seq(fd) if st.st_size else None) or next_seq
        if old is not None and old != self._stream:
            os.close(old)

    def follow_rotation(self, next_seq: int) -> None:
        """Reopen the path if the file we hold was renamed away or deleted."""
        if self.path is None or self.fd is None:
            return
        try:
            st = os.stat(self.path)
            current: tuple[int, int] | None = (st.st_dev, st.st_ino)
        except FileNotFoundError:
            current = None
        if current == self._ident:
            self._size = st.st_size  # copytruncate shrinks the file under us
        else:
            self.open(next_seq)
            log.info("audit log %s was rotated; continuing the chain in a new file", self.path)

    def reopen(self, next_seq: int) -> None:
        """Open the path again (after an external rotation); a failure is logged."""
        if self.path is not None and self.fd is not None:
            try:
                self.open(next_seq)
            except ConfigError as exc:
                self._errors.error("reopen", "cannot reopen the audit log: %s", exc.message)

    def _rotate(self, next_seq: int) -> None:
        """Size rotation: rename the file to ``<name>.<first seq>``; continue in a new one."""
        assert self.path is not None and self.fd is not None
        target = self.path.with_name(f"{self.path.name}.{self._first_seq:012d}")
        if target.exists():
            target = target.with_name(f"{target.name}.{int(time.time())}")
        os.fsync(self.fd)
        os.rename(self.path, target)
        self.open(next_seq)
        self._first_seq = next_seq
        log.info("audit log rotated to %s; the chain continues in %s", target.name, self.path)

    def append(self, data: bytes, *, next_seq: int, max_size: int | None) -> bool:
        """Append ``data`` (rotating first if it would pass ``max_size``); whole or not at all.

        Returns:
            Whether it was written; on failure the file is truncated back to
            where it started and the error logged.
        """
        if self.fd is None:
            return False
        start = self._size
        try:
            if (
                self.path is not None
                and max_size is not None
                and start > 0
                and start + len(data) > max_size
            ):
                self._rotate(next_seq)
                start = self._size
            view = memoryview(data)
            while view:
                view = view[os.write(self.fd, view) :]
        except (OSError, ConfigError) as exc:
            self._truncate_back(start)
            reason = exc.strerror if isinstance(exc, OSError) else exc.message
            self._errors.error(
                "write", "cannot write the audit log %s: %s", self.path or "stdout", reason
            )
            self.failing = True
            return False
        self._size = start + len(data)
        if self.failing:
            log.info("the audit log %s is writable again", self.path or "stdout")
            self.failing = False
        return True

    def _truncate_back(self, start: int) -> None:
        """Remove a partial batch: the file ends at ``start`` again (or at its last newline)."""
        if self.path is None or self.fd is None:
            return
        try:
            size = os.fstat(self.fd).st_size
            if size < start:  # truncated under us (copytruncate): keep whole lines only
                with open(self.fd, "rb", closefd=False) as fh:
                    start = _last_newline(fh, size) + 1
            if size != start:
                os.ftruncate(self.fd, start)
            self._size = start
        except OSError as exc:
            self._errors.error("truncate", "cannot truncate a torn audit record: %s", exc.strerror)

    def close(self) -> None:
        """Fsync and close the file (stdout stays open); later appends fail."""
        fd, self.fd = self.fd, None
        if fd is not None and self.path is not None:
            with contextlib.suppress(OSError):
                os.fsync(fd)
            os.close(fd)


_FIRST_SEQ = re.compile(rb'\{"seq":(\d{1,18}),')


def _first_seq(fd: int) -> int | None:
    """The ``seq`` of the file's first record (None if it does not start with one)."""
    try:
        head = os.pread(fd, 64, 0)
    except OSError:
        return None
    match = _FIRST_SEQ.match(head)
    return int(match.group(1)) if match else None


def _denied(exc: OSError, path: Path) -> str:
    """Owner, mode and fix when the log or its directory refuses the agent (else "")."""
    if not isinstance(exc, PermissionError) and exc.errno != errno.EROFS:
        return ""
    where = path if path.exists() else path.parent
    hint = fsutil.explain_denied(where, write=True, setting="audit.path")
    return f': {hint} (audit.path "-" writes the records to stdout)'
