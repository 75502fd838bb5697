"""The watch behind :meth:`FileStore.watch <agent.stores.file.FileStore.watch>`.

A watcher thread (watchfiles' ``RustNotify``, built off the event loop) feeds
batches of changed paths into a queue; the
consumer merges whatever queued up, maps the paths to secret names (through
the store, which knows the layout) and yields them as
:class:`~agent.stores.base.WatchEvent`. A failure of the watcher, or the
``secrets/`` directory being moved or replaced, ends the watch with
:class:`~agent.errors.BackendUnavailable`.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, NoReturn

from watchfiles import Change
from watchfiles._rust_notify import RustNotify

from agent.errors import BackendUnavailable
from agent.stores.base import WatchEvent

if TYPE_CHECKING:
    from agent.stores.file import FileStore

__all__ = ["Batch", "watch_store"]

#: One batch of changes from watchfiles: (kind of change, absolute path).
Batch = set[tuple[Change, str]]
_END = object()
_READY = object()


async def watch_store(store: FileStore) -> AsyncIterator[WatchEvent]:
    """The body of :meth:`FileStore.watch` (see there)."""
    identity = await asyncio.to_thread(store._start_watch)
    stop = threading.Event()
    queue: asyncio.Queue[object] = asyncio.Queue()  # _READY, batches, then an exception or _END
    loop = asyncio.get_running_loop()

    def post(item: object) -> None:
        with contextlib.suppress(RuntimeError):  # the loop closed: nobody listens any more
            loop.call_soon_threadsafe(queue.put_nowait, item)

    pump = asyncio.create_task(
        asyncio.to_thread(_watch_thread, store, stop, post), name=f"watch {store.root}"
    )
    try:
        # The watcher thread installs every inotify watch (building RustNotify
        # costs ~1 s per 10k directories, so not on the event loop) before it
        # posts _READY: nothing written after the resync below can be missed.
        first = await queue.get()
        if first is not _READY:
            _raise_from(first, store)
        yield WatchEvent(None)
        while True:
            changes = await _next_batch(queue, store)
            names = await asyncio.to_thread(store._changed_names, changes, identity)
            if names:
                yield WatchEvent(frozenset(names))
    finally:
        stop.set()  # the watcher thread notices within one step
        await _reap(pump)


def _watch_thread(store: FileStore, stop: threading.Event, post: Callable[[object], None]) -> None:
    """Own one RustNotify for the watch's life; post its batches (what ``awatch`` does).

    Periodic empty batches (``rust_timeout``) let the consumer notice the
    directory being moved away or replaced, as inotify would go quiet.
    """
    try:
        with RustNotify([str(store._secrets)], False, False, 300, True, False) as watcher:
            post(_READY)
            while not stop.is_set():
                raw = watcher.watch(
                    store.watch_debounce_ms,
                    store.watch_step_ms,
                    store.watch_check_interval_ms,
                    stop,
                )
                if raw == "stop":
                    break
                if raw == "timeout":
                    post(set())
                elif raw == "signal":
                    raise RuntimeError("the watch thread unexpectedly received a signal")
                else:
                    post({(Change(change), path) for change, path in raw})
    except Exception as exc:  # handed over to the consumer, which raises it
        post(exc)
    finally:
        post(_END)


async def _next_batch(queue: asyncio.Queue[object], store: FileStore) -> Batch:
    """The next batch, merged with any that queued up while the consumer was busy."""
    item = await queue.get()
    merged: Batch = set()
    while True:
        if not isinstance(item, set):
            _raise_from(item, store)
        merged |= item
        if queue.empty():
            return merged
        item = queue.get_nowait()


def _raise_from(item: object, store: FileStore) -> NoReturn:
    if isinstance(item, BaseException):
        raise BackendUnavailable(
            f"watching {store._secrets} failed: {type(item).__name__}: {item}"
        ) from item
    raise BackendUnavailable(f"watching {store._secrets} stopped unexpectedly")


async def _reap(pump: asyncio.Task[None]) -> None:  # the watcher thread's task
    """Wait for the pump to end after ``stop`` was set; cancel it if it does not."""
    _done, pending = await asyncio.wait({pump}, timeout=5.0)
    if pending:
        pump.cancel()
        await asyncio.wait({pump})
