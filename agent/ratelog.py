"""Rate-limited logging of repeated errors.

A broken store object, a flapping provider or a crash-looping part can fail the
same way many times a second. Each distinct problem (a caller-chosen key, e.g.
``("stages", name)``) is logged at most once per ``interval``; the next line
after a quiet period says how many were held back, so nothing is hidden and the
log cannot be flooded. The set of keys is bounded (least recently seen dropped).
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable

_MAX_KEYS = 1024


class RateLimitedLog:
    """Log each distinct repeated problem at most once per ``interval`` seconds."""

    def __init__(
        self,
        logger: logging.Logger,
        *,
        interval: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
        max_keys: int = _MAX_KEYS,
    ) -> None:
        self.logger = logger
        self.interval = interval
        self.clock = clock
        self.max_keys = max_keys
        #: key -> (time last logged, lines held back since)
        self._seen: OrderedDict[Hashable, tuple[float, int]] = OrderedDict()

    def log(self, level: int, key: Hashable, msg: str, *args: object) -> bool:
        """Log ``msg % args`` unless ``key`` was logged less than ``interval`` ago.

        Returns:
            Whether the line was written.
        """
        now = self.clock()
        last = self._seen.get(key)
        if last is not None and now - last[0] < self.interval:
            self._seen[key] = (last[0], last[1] + 1)
            self._seen.move_to_end(key)
            return False
        held = last[1] if last is not None else 0
        if held:
            msg += " (%d similar lines held back in the last %.0fs)"
            args = (*args, held, now - last[0]) if last is not None else args
        self.logger.log(level, msg, *args)
        self._seen[key] = (now, 0)
        self._seen.move_to_end(key)
        while len(self._seen) > self.max_keys:
            self._seen.popitem(last=False)
        return True

    def warning(self, key: Hashable, msg: str, *args: object) -> bool:
        return self.log(logging.WARNING, key, msg, *args)

    def error(self, key: Hashable, msg: str, *args: object) -> bool:
        return self.log(logging.ERROR, key, msg, *args)

    def forget(self, key: Hashable) -> None:
        """The problem ``key`` is over: its next occurrence is logged at once."""
        self._seen.pop(key, None)

    def forget_all(self, predicate: Callable[[Hashable], bool]) -> None:
        """Forget every key for which ``predicate(key)`` is true."""
        if self._seen:
            for key in [k for k in self._seen if predicate(k)]:
                del self._seen[key]
