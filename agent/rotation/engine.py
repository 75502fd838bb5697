"""The rotation engine: one attempt at the four steps, idempotent and resumable.

The store is the only shared state. Where a rotation stands is read from the
stage map each time, so a rotation interrupted anywhere (a failed step, a
crash, SIGKILL) is picked up by whoever tries next, in this process or another:

* no PENDING: step 1 (create) writes version ``token`` and stages it PENDING;
* PENDING holds a token: steps 2-4 run for it, whatever token was asked for
  (a PENDING left behind is resumed, never duplicated);
* CURRENT holds the token: the rotation is done.

Step 4 (finish) replaces the stage map in one compare-and-swap: PENDING
becomes CURRENT, the old CURRENT becomes PREVIOUS, PENDING is removed. Until
then CURRENT is untouched. Agents that rotate at once with the same token (a
scheduled slot) converge through the store's conditional writes: a Conflict
on ``write_version`` means another agent created the version first, and this
one continues with that version; a Conflict on a stage move means the map
changed, so it is read again. Every stage move goes through
:meth:`~agent.writer.SecretWriter.apply_stages`.

Each step's outcome is one metric increment and one audit record; a failure is
also one log line naming the secret, the step and the reason, never a value.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from agent.audit import Auditor, NullAudit
from agent.deletion import deletion_of, not_found
from agent.errors import AgentError, BackendUnavailable, Conflict, NotFound, SecretNotFound
from agent.metrics import Metrics
from agent.resolver import Resolver
from agent.retention import prune_quietly
from agent.rotation.base import STEPS, RotationContext, RotationFailed, Rotator
from agent.stores.base import StageState
from agent.types import CURRENT, PENDING, PREVIOUS, Secret, SecretValue, utcnow, validate_name
from agent.writer import SecretWriter

log = logging.getLogger(__name__)

#: Stage-map compare-and-swap retries before a step gives up (the map kept moving).
_CAS_ATTEMPTS = 8
#: The metric label of a rotation made outside any configured rule (CLI flags only).
ADHOC = "(adhoc)"

Outcome = Literal["rotated", "already_current", "superseded"]


class StepUnavailable(BackendUnavailable):
    """A step met a transient error (store, key provider or target unreachable)."""

    def __init__(self, message: str, *, step: str) -> None:
        super().__init__(message)
        self.step = step


@dataclass(frozen=True, slots=True)
class RotationResult:
    """What one attempt did."""

    name: str
    token: str
    outcome: Outcome
    #: The steps this attempt ran, in order.
    steps: tuple[str, ...] = ()
    #: True when the attempt resumed a PENDING version found in the store.
    resumed: bool = False


@dataclass(frozen=True, slots=True)
class RotationPlan:
    """Where a rotation would start (``rotate --dry-run``); no value in it."""

    name: str
    token: str
    first_step: str | None
    current_version: str | None
    pending_version: str | None
    resumed: bool

    def describe(self) -> str:
        if self.first_step is None:
            return f"{self.name}: version {self.token} is already CURRENT; nothing to do"
        what = "resume PENDING" if self.resumed else "create PENDING"
        return (
            f"{self.name}: would {what} version {self.token} from step {self.first_step!r} "
            f"(CURRENT is {self.current_version or 'none'})"
        )


@dataclass
class _Progress:
    """The step a failed attempt stopped at, so this process resumes there."""

    token: str
    step: str


@dataclass
class RotationEngine:
    """Runs rotations against one store with one writer.

    Args:
        writer: seals versions and moves stages (every stage move goes through it).
        resolver: decrypts the CURRENT and PENDING values for the rotator.
        metrics: ``secrets_agent_rotation_steps_total`` and friends.
        audit: one ``rotation_step`` record per step, one ``rotated`` per success.
    """

    writer: SecretWriter
    resolver: Resolver
    metrics: Metrics | None = None
    audit: Auditor = field(default_factory=NullAudit)
    _progress: dict[str, _Progress] = field(default_factory=dict)

    # ------------------------------------------------------------------ public

    async def plan(self, name: str, *, token: str | None = None) -> RotationPlan:
        """Where :meth:`rotate` would start, without calling the rotator or writing."""
        validate_name(name)
        state = await self._stages(name)
        deletion = deletion_of(state.stages)
        if deletion is not None:
            raise not_found(name, deletion)
        token, resumed = self._token(state, token)
        cur, pending = state.version_for(CURRENT), state.version_for(PENDING)
        if pending is None and cur == token:
            first = None
        elif pending == token:
            first = self._resume_step(name, token) if await self._exists(name, token) else "create"
        else:
            first = "create"
        return RotationPlan(name, token, first, cur, pending, resumed)

    async def rotate(
        self,
        name: str,
        rotator: Rotator,
        *,
        token: str | None = None,
        params: Mapping[str, Any] | None = None,
        label: str = ADHOC,
    ) -> RotationResult:
        """Run (or resume) one rotation of ``name`` to version ``token``.

        ``token`` defaults to a new UUID. If the store holds a PENDING version
        already, that rotation is resumed instead and its token is the result's.

        Raises:
            RotationFailed: a step failed; CURRENT is untouched and the next
                attempt resumes from that step.
            BackendUnavailable: the store, a key provider or the target was
                unreachable (transient: retry with backoff).
            SecretNotFound: the secret is deleted (scheduled or purged).
        """
        validate_name(name)
        params = dict(params or {})
        state = await self._stages(name)
        deletion = deletion_of(state.stages)
        if deletion is not None:
            raise not_found(name, deletion)  # a deleted secret is not rotated back to life
        token, resumed = self._token(state, token)
        if resumed:
            log.info("rotation of %s: resuming PENDING version %s", name, token)
        elif state.version_for(CURRENT) == token:
            return RotationResult(name, token, "already_current")
        current = await self._current(name, state)
        ran: list[str] = []
        run = _Run(self, name, token, label, rotator, params, current)
        if state.version_for(PENDING) != token or not await self._exists(name, token):
            # (A PENDING whose version is gone, deleted by hand or lost in a
            # restore, is made again: step 1 with the same token.)
            if await self._superseded(name, token, state):
                return RotationResult(name, token, "superseded")
            ran.append("create")
            if await run.step("create", self._create(run)) == "done":
                return RotationResult(name, token, "already_current", tuple(ran), resumed)
            start = "set"
        else:
            start = self._resume_step(name, token)
        pending = await self._pending(name, token)
        for step in STEPS[STEPS.index(start) :]:
            ran.append(step)
            if step == "finish":
                await run.step("finish", self._finish(name, token))
            else:
                await run.step(step, run.call(step, pending))
        self._progress.pop(name, None)
        self._record_success(name, token, label)
        return RotationResult(name, token, "rotated", tuple(ran), resumed)

    # ------------------------------------------------------------------ steps

    async def _create(self, run: _Run) -> str:
        """Step 1: write version ``token`` (or find it written) and stage it PENDING.

        Returns ``"done"`` when another agent already finished this rotation.
        """
        name, token = run.name, run.token
        value = await run.rotator.create(run.context(None))
        if not value:
            raise RotationFailed("the rotator made no value (expected non-empty bytes)")
        value_type = run.current.value_type if run.current is not None else "string"
        envelope = await self.writer.seal(name, token, value, value_type)
        try:
            await self.writer.store.write_version(name, token, envelope)
        except Conflict:
            # Another agent created this version first: continue with theirs.
            log.info("rotation of %s: version %s exists already; continuing with it", name, token)
        for _ in range(_CAS_ATTEMPTS):
            state = await self._stages(name)
            stages = state.stages
            if stages.get(PENDING) == token:
                return "pending"
            if token in (stages.get(CURRENT), stages.get(PREVIOUS)):
                return "done"
            if stages.get(PENDING) is not None:
                raise RotationFailed(
                    f"another rotation (PENDING version {stages[PENDING]}) started meanwhile"
                )
            new = {**stages, PENDING: token}
            try:
                await self.writer.apply_stages(name, new, expected_revision=state.revision)
                return "pending"
            except Conflict:
                continue
        raise BackendUnavailable(f"the stage map of {name!r} kept changing; will retry")

    async def _finish(self, name: str, token: str) -> None:
        """Step 4: PENDING -> CURRENT, old CURRENT -> PREVIOUS, in one compare-and-swap."""
        for _ in range(_CAS_ATTEMPTS):
            state = await self._stages(name)
            stages = state.stages
            if stages.get(CURRENT) == token and stages.get(PENDING) != token:
                return  # another agent finished it
            if stages.get(PENDING) != token:
                raise RotationFailed(
                    f"PENDING no longer holds version {token}; someone moved it meanwhile"
                )
            new = finished(stages, token)
            try:
                await self.writer.apply_stages(name, new, expected_revision=state.revision)
            except Conflict:
                continue
            if self.writer.retention is not None:
                await prune_quietly(self.writer.store, name, self.writer.retention, now=utcnow())
            return
        raise BackendUnavailable(f"the stage map of {name!r} kept changing; will retry")

    # ---------------------------------------------------------------- helpers

    def _token(self, state: StageState, token: str | None) -> tuple[str, bool]:
        pending = state.version_for(PENDING)
        if pending is not None:
            return pending, True
        return token or str(uuid.uuid4()), False

    def _resume_step(self, name: str, token: str) -> str:
        progress = self._progress.get(name)
        if progress is not None and progress.token == token and progress.step in STEPS[1:]:
            return progress.step
        return "set"  # set and test are idempotent: re-running set is always safe

    async def _stages(self, name: str) -> StageState:
        try:
            return await self.writer.store.read_stages(name)
        except SecretNotFound:
            return StageState({}, "")

    async def _current(self, name: str, state: StageState) -> Secret | None:
        cur = state.version_for(CURRENT)
        return None if cur is None else await self.resolver.fetch(name, cur, stages=(CURRENT,))

    async def _pending(self, name: str, token: str) -> SecretValue:
        return (await self.resolver.fetch(name, token, stages=(PENDING,))).value

    async def _exists(self, name: str, token: str) -> bool:
        try:
            await self.writer.store.read_version(name, token)
        except NotFound:
            return False
        return True

    async def _superseded(self, name: str, token: str, state: StageState) -> bool:
        """True when version ``token`` exists, unstaged, and is older than CURRENT.

        Then that rotation finished long ago and later ones pushed it out of
        PREVIOUS: doing it again would roll back. A version that exists unstaged
        and is newer than CURRENT is a step 1 interrupted between its write and
        its stage move; it is resumed.
        """
        if token in state.stages.values():
            return False
        try:
            versions = dict(await self.writer.store.list_versions(name))
        except NotFound:
            return False
        if token not in versions:
            return False
        cur = state.version_for(CURRENT)
        return cur is not None and cur in versions and versions[token] <= versions[cur]

    def _record_success(self, name: str, token: str, label: str) -> None:
        if self.metrics is not None:
            self.metrics.rotations_done.labels(label, "rotated").inc()
            self.metrics.rotation_last_success.labels(label).set(time.time())
        self.audit.record("rotated", secret=name, version=token, stage=CURRENT, outcome="ok")
        log.info("rotated %s: version %s is CURRENT", name, token)

    def record_step(
        self, name: str, token: str, label: str, step: str, outcome: str, reason: str | None
    ) -> None:
        """Count, audit and (for a failure) log one step's outcome."""
        if self.metrics is not None:
            self.metrics.rotations.labels(label, step, outcome).inc()
        self.audit.record(
            "rotation_step",
            secret=name,
            version=token,
            stage=step,
            outcome=outcome,
            reason=reason,
        )
        if outcome != "ok":
            log.warning("rotation of %s failed at step %s: %s", name, step, reason)
            self._progress[name] = _Progress(token, step)
            if self.metrics is not None:
                self.metrics.rotations_done.labels(label, outcome).inc()


def finished(stages: Mapping[str, str], token: str) -> dict[str, str]:
    """The stage map after step 4: PENDING -> CURRENT, old CURRENT -> PREVIOUS."""
    new = dict(stages)
    old = new.get(CURRENT)
    new[CURRENT] = token
    if old is not None and old != token:
        new[PREVIOUS] = old
    new.pop(PENDING, None)
    return new


@dataclass
class _Run:
    """One attempt's fixed inputs, and the step wrapper that records outcomes."""

    engine: RotationEngine
    name: str
    token: str
    label: str
    rotator: Rotator
    params: dict[str, Any]
    current: Secret | None

    def context(self, pending: SecretValue | None) -> RotationContext:
        return RotationContext(
            name=self.name,
            token=self.token,
            current=self.current.value if self.current is not None else None,
            current_version=self.current.version_id if self.current is not None else None,
            pending=pending,
            params=self.params,
            read_secret=self._read_secret,
        )

    async def _read_secret(self, name: str) -> SecretValue:
        resolver = self.engine.resolver
        state = await resolver.stages(name)
        cur = state.version_for(CURRENT)
        if cur is None:
            raise SecretNotFound(f"secret {name!r} has no CURRENT version")
        return (await resolver.fetch(name, cur, stages=(CURRENT,))).value

    async def call(self, step: str, pending: SecretValue) -> None:
        ctx = self.context(pending)
        if step == "set":
            await self.rotator.set(ctx)
        else:
            await self.rotator.test(ctx)

    async def step(self, step: str, work: Any) -> Any:
        """Await ``work`` (a step's coroutine) and record its outcome."""
        record = self.engine.record_step
        try:
            result = await work
        except RotationFailed as exc:
            record(self.name, self.token, self.label, step, "failed", exc.message)
            raise RotationFailed(exc.message, step=step) from None
        except BackendUnavailable as exc:
            record(self.name, self.token, self.label, step, "unavailable", exc.message)
            raise StepUnavailable(exc.message, step=step) from None
        except AgentError as exc:
            record(self.name, self.token, self.label, step, "failed", exc.message)
            raise RotationFailed(exc.message, step=step) from None
        except Exception as exc:
            # A rotator bug. Its message could hold anything: name only its type.
            reason = f"unexpected {type(exc).__name__} in the rotator"
            record(self.name, self.token, self.label, step, "failed", reason)
            raise RotationFailed(reason, step=step) from None
        record(self.name, self.token, self.label, step, "ok", None)
        return result
