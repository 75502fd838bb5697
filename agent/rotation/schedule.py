"""Rotation schedules: ``every: 30d`` or a cron expression, cut into slots.

Time is cut into slots: for ``every: D``, slot k is ``[k*D, (k+1)*D)`` counted
from the Unix epoch; for a cron expression (UTC; 5 fields, or 6 with seconds
last), a slot runs from one firing to the next. A rotation is due in a slot
when the CURRENT version was created before the slot began. Its token (the new
version's id) is a UUIDv5 of the secret name and the slot's start, so every
agent that rotates in that slot computes the same id, and the store's
conditional writes let exactly one version be created for it.

An optional ``window`` limits when in the slot a rotation may start (like the
``Duration`` of a Secrets Manager schedule): from the slot's start to
``start + window``. A PENDING rotation left behind is resumed at any time.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import UTC, datetime

#: Namespace of slot tokens (a fixed random UUID; changing it changes every token).
TOKEN_NAMESPACE = uuid.UUID("4f8c2b9e-6a51-4d0e-9a3c-7c1d5e2f8b60")


@dataclass(frozen=True, slots=True)
class Slot:
    """One slot of a schedule, in Unix seconds: ``[start, end)``."""

    start: float
    end: float

    def token(self, name: str) -> str:
        """The deterministic version id of this slot's rotation of ``name``."""
        return str(uuid.uuid5(TOKEN_NAMESPACE, f"{name}\n{round(self.start * 1000)}"))


def cron_is_valid(expression: str) -> bool:
    """True for a cron expression croniter accepts (5 fields, or 6 with seconds)."""
    from croniter import croniter

    return len(expression.split()) in (5, 6) and bool(croniter.is_valid(expression))


@dataclass(frozen=True, slots=True)
class Schedule:
    """``every`` seconds or a cron expression, with an optional start window."""

    every: float | None = None
    cron: str | None = None
    window: float | None = None

    def __post_init__(self) -> None:
        if (self.every is None) == (self.cron is None):
            raise ValueError("a schedule is 'every' or 'cron', exactly one")
        if self.every is not None and self.every < 1:
            raise ValueError("'every' must be 1s or more")

    def slot_at(self, now: float) -> Slot:
        """The slot that contains ``now``."""
        if self.every is not None:
            step = round(self.every * 1000)
            first = (int(now * 1000) // step) * step
            return Slot(first / 1000, (first + step) / 1000)
        from croniter import croniter

        assert self.cron is not None
        # A firing exactly at ``now`` starts the slot: look back from just after it.
        start = float(croniter(self.cron, now + 0.0005).get_prev(float))
        end = float(croniter(self.cron, start).get_next(float))
        return Slot(start, end)

    def in_window(self, slot: Slot, now: float) -> bool:
        """Whether a new rotation may start at ``now`` in ``slot``."""
        return self.window is None or now < slot.start + self.window

    def describe(self) -> str:
        base = f"every {self.every:g}s" if self.every is not None else f"cron {self.cron!r} (UTC)"
        return base if self.window is None else f"{base}, window {self.window:g}s"


def iso(ts: float | None) -> str | None:
    """Unix seconds as an ISO-8601 UTC string (None stays None)."""
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
