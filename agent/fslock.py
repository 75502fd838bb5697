"""An inter-process lock on a lock file (``flock(2)``), for threads and the event loop.

Used by the file store for stage moves and re-encryption; re-exported by
:mod:`agent.fsutil`.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
from pathlib import Path
from types import TracebackType


class FileLock:
    """An exclusive ``flock(2)`` on a lock file, between processes and threads.

    Each instance opens the lock file itself, so two instances exclude each
    other even within one process (flock locks belong to the open file
    description). Not reentrant. Use ``with`` from threads, ``async with``
    from the event loop (the blocking acquisition runs in a worker thread).

    The lock file is created with ``mode`` if missing and is never removed:
    unlinking it while another process waits on it would let two holders in.

    Kept instead of the ``filelock`` package (issue 15), on reasoning: its
    crash semantics are the same (both use ``flock``, which the kernel drops
    when the holder dies), but its blocking ``acquire`` polls ``LOCK_NB``
    every ``poll_interval`` (50 ms by default) instead of sleeping in the
    kernel's queue. Stage moves are short and contended when several agents
    rotate at once, and the propagation target is under 100 ms p99, so a
    50 ms poll step would cost a visible share of it; the kernel also wakes
    a waiter at once. Its async lock runs in a thread like this one, and its
    reentrancy (a count per object) is a feature we do not want: a second
    acquire here is a bug and raises.
    """

    def __init__(self, path: Path, *, mode: int = 0o600) -> None:
        self.path = path
        self.mode = mode
        self._fd: int | None = None

    @property
    def locked(self) -> bool:
        """Whether this instance holds the lock."""
        return self._fd is not None

    def acquire(self, *, blocking: bool = True) -> bool:
        """Take the lock; with ``blocking=False`` return False instead of waiting."""
        if self._fd is not None:
            raise RuntimeError(f"lock {self.path} is already held by this FileLock")
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, self.mode)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if blocking else fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        return True

    def release(self) -> None:
        """Drop the lock (closing the descriptor releases the flock)."""
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)

    def __enter__(self) -> FileLock:
        self.acquire()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()

    async def __aenter__(self) -> FileLock:
        loop = asyncio.get_running_loop()
        future = loop.run_in_executor(None, self.acquire)
        try:
            # Shielded: a cancelled waiter must not leave a worker thread that
            # later takes the lock with nobody left to release it.
            await asyncio.shield(future)
        except asyncio.CancelledError:
            future.add_done_callback(self._release_if_acquired)
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()

    def _release_if_acquired(self, future: asyncio.Future[bool]) -> None:
        if not future.cancelled() and future.exception() is None:
            self.release()
