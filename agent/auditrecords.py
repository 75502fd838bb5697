"""Audit records before they reach the file: fields, the chained line, and aggregation.

A record is a dict (``time`` as a float until it is formatted); :func:`chain`
turns a batch of them into JSON lines that continue the hash chain, and
:class:`Aggregates` counts the repeats of like records within an interval so
a flood of them costs one record, not one each.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from agent.auditverify import line_hash

if TYPE_CHECKING:
    from agent.server.peer import Caller

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
        "secret_deleted",
        "secret_restored",
        "secret_purged",
        "config_reloaded",
        "envelope_refused",
        "records_dropped",
    }
)
_EVENT_RE = re.compile(r"[a-z][a-z_]{0,31}")
#: Distinct (event, caller, secret, reason) keys aggregated per interval; the
#: rest of the interval's refusals are counted in one overflow record.
MAX_AGGREGATE_KEYS = 256
_OVERFLOW_REASON = "more distinct callers, names or reasons than aggregated one by one"


def new_record(
    event: str,
    *,
    caller: Caller | None,
    secret: str | None,
    version: str | None,
    stage: str | None,
    outcome: str,
    reason: str | None,
) -> dict[str, Any]:
    """A record of ``event`` now, with the fields that are set.

    Raises:
        ValueError: ``event`` is not a short snake_case word.
    """
    if not _EVENT_RE.fullmatch(event):
        raise ValueError(f"audit event names are short snake_case words, got {event!r}")
    doc: dict[str, Any] = {"time": time.time(), "event": event, "outcome": outcome}
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
    return doc


class Clock:
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


def chain(
    docs: Iterable[dict[str, Any]], *, seq: int, prev: str, clock: Clock
) -> tuple[bytes, str]:
    """The lines of ``docs`` (newline-terminated), chained after record ``seq`` whose hash is
    ``prev``, and the hash of the last of them."""
    lines = []
    for doc in docs:
        seq += 1
        out = {"seq": seq, "time": clock.format(doc["time"])}
        out.update((k, v) for k, v in doc.items() if k != "time")
        out["prev"] = prev
        line = json.dumps(out, separators=(",", ":"), ensure_ascii=True).encode()
        lines.append(line)
        prev = line_hash(line)
    return b"\n".join(lines) + b"\n", prev


class _Aggregate:
    """Repeats of one record within an interval: counted, written as one record."""

    __slots__ = ("count", "fields", "first")

    def __init__(self, fields: dict[str, Any], first: float) -> None:
        self.fields = fields
        self.first = first
        self.count = 0


class Aggregates:
    """Like records within one interval: the first is written, the repeats only counted.

    Records are alike when event, outcome, caller, secret, version, stage
    (and, with ``by_reason``, the reason) match. Past
    :data:`MAX_AGGREGATE_KEYS` distinct keys, the rest of an event's records
    in the interval are counted under one overflow key.
    """

    def __init__(self, *, by_reason: bool) -> None:
        self._by_reason = by_reason
        self._table: dict[tuple[Any, ...], _Aggregate] = {}
        #: Repeats counted instead of written, since the start.
        self.repeats = 0
        #: When the current interval started (``time.monotonic()``).
        self.started = time.monotonic()

    def first(self, doc: dict[str, Any]) -> bool:
        """Whether ``doc`` is written now (first of its key); repeats are only counted."""
        table = self._table
        caller = json.dumps(doc.get("caller"), sort_keys=True)
        key: tuple[Any, ...] = (
            doc["event"],
            doc["outcome"],
            caller,
            doc.get("secret"),
            doc.get("version"),
            doc.get("stage"),
            doc.get("reason") if self._by_reason else None,
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
        self.repeats += 1
        return False

    def drain(self, clock: Clock) -> list[dict[str, Any]]:
        """One record with ``count`` per key repeated in the interval; the next one starts empty."""
        now = time.time()
        out = []
        for entry in self._table.values():
            if entry.count:
                doc = {"time": now, **entry.fields, "count": entry.count}
                doc["since"] = clock.format(entry.first)
                out.append(doc)
        self._table.clear()
        return out
