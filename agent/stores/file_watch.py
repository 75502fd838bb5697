"""The watch behind :meth:`FileStore.watch <agent.stores.file.FileStore.watch>`.

A pump task feeds watchfiles' batches of changed paths into a queue; the
consumer merges whatever queued up, maps the paths to secret names (through
the store, which knows the layout) and yields them as
:class:`~agent.stores.base.WatchEvent`. A failure of the watcher, or the
``secrets/`` directory being moved or replaced, ends the watch with
:class:`~agent.errors.BackendUnavailable`.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, NoReturn

from watchfiles import Change, awatch

from agent.errors import BackendUnavailable
from agent.stores.base import WatchEvent

if TYPE_CHECKING:
    from agent.stores.file import FileStore

__all__ = ["Batch", "watch_store"]

#: One batch of changes from watchfiles: (kind of change, absolute path).
Batch = set[tuple[Change, str]]
_END = object()


async def watch_store(store: FileStore) -> AsyncIterator[WatchEvent]:
    """The body of :meth:`FileStore.watch` (see there)."""
    identity = await asyncio.to_thread(store._start_watch)
    stop = asyncio.Event()
    queue: asyncio.Queue[object] = asyncio.Queue()  # batches, then an exception or _END
    pump = asyncio.create_task(_pump(store, stop, queue), name=f"watch {store.root}")
    try:
        # One loop pass runs the pump up to its first real wait, and awatch
        # installs every inotify watch (RustNotify) before that: so nothing
        # written after the resync below can be missed.
        await asyncio.sleep(0)
        if pump.done():
            _raise_from(queue.get_nowait(), store)
        yield WatchEvent(None)
        while True:
            changes = await _next_batch(queue, store)
            names = await asyncio.to_thread(store._changed_names, changes, identity)
            if names:
                yield WatchEvent(frozenset(names))
    finally:
        stop.set()  # the watcher thread notices within one step
        await _reap(pump)


async def _pump(store: FileStore, stop: asyncio.Event, queue: asyncio.Queue[object]) -> None:
    """Feed watchfiles' batches into ``queue``; an exception or _END ends the stream."""
    try:
        async for changes in awatch(
            store._secrets,
            watch_filter=None,  # the default filter drops names like node_modules/ or *~
            debounce=store.watch_debounce_ms,
            step=store.watch_step_ms,
            stop_event=stop,
            # Wake up periodically even without changes, to notice the
            # directory being moved away or replaced (inotify would go quiet).
            rust_timeout=store.watch_check_interval_ms,
            yield_on_timeout=True,
        ):
            queue.put_nowait(changes)
    except Exception as exc:  # handed over to the consumer, which raises it
        queue.put_nowait(exc)
    finally:
        queue.put_nowait(_END)


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


async def _reap(pump: asyncio.Task[None]) -> None:
    """Wait for the pump to end after ``stop`` was set; cancel it if it does not."""
    _done, pending = await asyncio.wait({pump}, timeout=5.0)
    if pending:
        pump.cancel()
        await asyncio.wait({pump})
