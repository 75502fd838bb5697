"""Scheduled rotation in the running agent: one loop over the config's rules.

Each rule is checked when its next slot begins (and, after a failure, after a
jittered exponential backoff). A check reads the stage map: a PENDING version
is resumed; otherwise a rotation is due when CURRENT was created before the
slot began, and then it runs with the slot's deterministic token, so agents
sharing a store converge on one new version without a lock.

The loop itself never ends on a rotation error: those are recorded (metric,
audit record, log line, ``/v1/status``) and retried. An unexpected exception
is a bug and ends :meth:`RotationScheduler.run`; the daemon's supervisor
restarts it. Rules follow config reloads through :meth:`reconfigure`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from agent.config import RotationConfig
from agent.deletion import is_deleted
from agent.errors import AgentError, BackendUnavailable
from agent.metrics import Metrics
from agent.registry import load_backend
from agent.rotation.base import ROTATORS, RotationFailed, Rotator
from agent.rotation.engine import RotationEngine, RotationResult
from agent.rotation.schedule import Schedule, Slot, iso
from agent.stores.base import WritableStore
from agent.types import CURRENT, PENDING

log = logging.getLogger(__name__)

BACKOFF_INITIAL = 1.0
BACKOFF_MAX = 300.0
#: The loop wakes at least this often, so a clock jump is noticed.
MAX_SLEEP = 60.0


def build_rotator(rule: RotationConfig) -> Rotator:
    """The rule's rotator, built from its params (ConfigError if they are bad)."""
    rotator: Rotator = load_backend(ROTATORS, rule.rotator, "rotator")(rule.params)
    return rotator


def schedule_of(rule: RotationConfig) -> Schedule:
    return Schedule(every=rule.every, cron=rule.cron, window=rule.window)


@dataclass(frozen=True, slots=True)
class Due:
    """Whether a rotation should run now, with which token, and when to look next."""

    run: bool
    token: str | None
    next_check: float
    reason: str


async def check_due(
    store: WritableStore, name: str, schedule: Schedule, now: float | None = None
) -> Due:
    """Decide from the store whether ``name`` is due in the current slot.

    A PENDING version is always due (a rotation to resume). Otherwise the
    rotation is due when CURRENT was created before the slot began (or there is
    no CURRENT) and the slot's start window is open.
    """
    now = time.time() if now is None else now
    slot: Slot = schedule.slot_at(now)
    state = await store.read_stages(name)
    if is_deleted(state.stages):
        return Due(False, None, slot.end, "the secret is deleted")
    if state.version_for(PENDING) is not None:
        return Due(True, state.version_for(PENDING), now, "a PENDING rotation to resume")
    cur = state.version_for(CURRENT)
    if cur is not None:
        created = (await store.read_version(name, cur)).created_at.timestamp()
        if created >= slot.start:
            return Due(False, None, slot.end, "CURRENT was created in this slot")
    if not schedule.in_window(slot, now):
        return Due(False, None, slot.end, "outside the rotation window")
    return Due(True, slot.token(name), now, "due in this slot")


@dataclass
class RuleState:
    """A rule, its rotator and what happened to it; shown in ``/v1/status``."""

    rule: RotationConfig
    schedule: Schedule
    rotator: Rotator | None = None
    next_at: float = 0.0
    failures: int = 0
    last_result: str | None = None
    last_error: str | None = None
    last_step: str | None = None
    last_attempt: float | None = None
    last_success: float | None = None
    pending: str | None = None

    def status(self) -> dict[str, Any]:
        return {
            "secret": self.rule.secret,
            "rotator": self.rule.rotator,
            "schedule": self.schedule.describe(),
            "next_at": iso(self.next_at),
            "last_attempt": iso(self.last_attempt),
            "last_result": self.last_result,
            "last_error": self.last_error,
            "failed_step": self.last_step,
            "last_success": iso(self.last_success),
            "failures_in_a_row": self.failures,
            "pending_version": self.pending,
            "failing": self.failures >= self.rule.flag_after_failures,
        }


@dataclass
class RotationScheduler:
    """Runs the rules of ``rotation:`` in the agent."""

    engine: RotationEngine
    rules: Sequence[RotationConfig]
    metrics: Metrics | None = None
    #: Called after a completed rotation (the daemon refreshes its cache at once).
    on_rotated: Callable[[str], Awaitable[None]] | None = None
    states: dict[str, RuleState] = field(default_factory=dict)
    _wake: asyncio.Event = field(default_factory=asyncio.Event)
    _retired: list[Rotator] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.reconfigure_rules(self.rules)

    @property
    def store(self) -> WritableStore:
        return self.engine.writer.store

    # --------------------------------------------------------------- config

    def reconfigure(self, config: Any) -> None:
        """Reload hook: follow the new config's ``rotation`` rules."""
        self.reconfigure_rules(config.rotation)

    def reconfigure_rules(self, rules: Sequence[RotationConfig]) -> None:
        """Keep the state of unchanged rules; start new ones now; retire removed ones."""
        new: dict[str, RuleState] = {}
        for rule in rules:
            old = self.states.get(rule.secret)
            if old is not None and old.rule == rule:
                new[rule.secret] = old
            else:
                if old is not None and old.rotator is not None:
                    self._retired.append(old.rotator)
                new[rule.secret] = RuleState(rule, schedule_of(rule))
        for name, old in self.states.items():
            if name not in new and old.rotator is not None:
                self._retired.append(old.rotator)
            if name not in new and self.metrics is not None:
                for gauge in (self.metrics.rotation_next, self.metrics.rotation_failures_in_a_row):
                    with contextlib.suppress(KeyError):
                        gauge.remove(name)
        self.rules = list(rules)
        self.states = new
        if self.metrics is not None:
            self.metrics.zero_rotation_errors(list(new))
        self._wake.set()

    # ----------------------------------------------------------------- loop

    async def run(self) -> None:
        """Check each rule when it is due, forever (cancel to stop)."""
        try:
            while True:
                await self._close_retired()
                now = time.time()
                for st in list(self.states.values()):
                    if st.next_at <= now and self.states.get(st.rule.secret) is st:
                        await self.check(st)
                await self._sleep()
        finally:
            await self.aclose()

    async def _sleep(self) -> None:
        self._wake.clear()
        nexts = [st.next_at for st in self.states.values()]
        delay = min(nexts, default=time.time() + MAX_SLEEP) - time.time()
        delay = min(max(delay, 0.0), MAX_SLEEP)
        if delay > 0:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):  # not wait_for: see stores/etcd.py
                    await self._wake.wait()

    async def check(self, st: RuleState) -> RotationResult | None:
        """Check one rule now; rotate if due; record the outcome. Never raises AgentError."""
        name = st.rule.secret
        try:
            due = await check_due(self.store, name, st.schedule)
            if not due.run:
                st.next_at = due.next_check
                self._gauge_next(st)
                return None
            if st.rotator is None:
                st.rotator = build_rotator(st.rule)
            st.last_attempt = time.time()
            st.pending = due.token
            result = await self.engine.rotate(
                name, st.rotator, token=due.token, params=st.rule.params, label=name
            )
        except AgentError as exc:
            self._failed(st, exc)
            return None
        st.failures, st.last_error, st.last_step, st.pending = 0, None, None, None
        st.last_result = result.outcome
        if result.outcome == "rotated":
            st.last_success = time.time()
            if self.on_rotated is not None:
                await self.on_rotated(name)
        # Look again at once: a resumed older PENDING may leave this slot's rotation to do.
        st.next_at = time.time() if result.resumed else st.schedule.slot_at(time.time()).end
        self._gauge_next(st)
        self._gauge_failures(st)
        return result

    def _failed(self, st: RuleState, exc: AgentError) -> None:
        st.failures += 1
        st.last_result = "unavailable" if isinstance(exc, BackendUnavailable) else "failed"
        st.last_error = exc.message[:300]
        st.last_step = getattr(exc, "step", None) or None
        delay = min(BACKOFF_MAX, BACKOFF_INITIAL * 2 ** min(st.failures - 1, 16))
        st.next_at = time.time() + delay * random.uniform(0.8, 1.2)  # noqa: S311 - jitter
        if not isinstance(exc, RotationFailed | BackendUnavailable):
            log.warning("rotation check of %s failed: %s", st.rule.secret, st.last_error)
        if self.metrics is not None and st.last_step is None:
            self.metrics.rotations_done.labels(st.rule.secret, st.last_result).inc()
        self._gauge_next(st)
        self._gauge_failures(st)

    def _gauge_next(self, st: RuleState) -> None:
        if self.metrics is not None:
            self.metrics.rotation_next.labels(st.rule.secret).set(st.next_at)

    def _gauge_failures(self, st: RuleState) -> None:
        if self.metrics is not None:
            self.metrics.rotation_failures_in_a_row.labels(st.rule.secret).set(st.failures)

    # --------------------------------------------------------------- status

    def status(self) -> dict[str, Any]:
        """``/v1/status``: each rule's state, and the secrets whose rotation is failing."""
        rules = [st.status() for st in self.states.values()]
        return {
            "rotation": rules,
            "rotation_failing": [r["secret"] for r in rules if r["failing"]],
        }

    async def _close_retired(self) -> None:
        while self._retired:
            rotator = self._retired.pop()
            try:
                await rotator.aclose()
            except Exception as exc:
                log.warning("closing a retired rotator failed: %s", type(exc).__name__)

    async def aclose(self) -> None:
        """Close every rotator."""
        for st in self.states.values():
            if st.rotator is not None:
                self._retired.append(st.rotator)
                st.rotator = None
        await self._close_retired()
