"""Small asyncio helpers that never swallow a cancellation.

On Python 3.11, ``asyncio.wait_for`` can lose a ``cancel()`` that arrives while
the awaited thing completes (cpython gh-86296): the task then runs on after
shutdown asked it to stop, and the daemon hangs on exit. ``asyncio.timeout``
does not have that race, so waits with a deadline go through here.
"""

from __future__ import annotations

import asyncio


async def wait_event(event: asyncio.Event, seconds: float) -> bool:
    """Wait until ``event`` is set or ``seconds`` pass; return whether it was set."""
    try:
        async with asyncio.timeout(max(0.0, seconds)):
            await event.wait()
    except TimeoutError:
        return False
    return True
