"""The one read path every route shares: access check, cache lookup, audit record.

The order matters for what a caller can learn:

1. The name is checked against the rules *before* any lookup, so a caller no
   rule lets read a name gets the same 403 whether or not the secret exists.
   The audit record says which it was, as far as the agent knows without a
   store round trip (which would show in timing).
2. The stage is checked once the version is found: a caller allowed the name
   learns that a stage is missing (404) or not allowed to it (403). A read by
   version id is checked against the stages that version carries.
3. The ``read`` record is written (``required``) before the value is
   returned: the read waits for its batch (group commit); if the audit log
   cannot be written, the read fails with 503.

Every decision is counted in ``access_decisions`` and audited.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

from aiohttp import web

from agent.cache import Lookup
from agent.errors import AccessDenied, AgentError, BadRequest, NotFound
from agent.server.peer import Caller
from agent.server.state import STATE, ServerState, caller_of
from agent.types import CURRENT, Secret, normalize_stage, validate_name, validate_version_id


class StageMismatch(BadRequest):
    """A read named a version and a stage, and that version does not carry the stage."""

    code = "stage_mismatch"


def _denied(name: str) -> AccessDenied:
    # One message for every refusal of a name: it must not tell a missing secret apart.
    return AccessDenied(f"access to secret {name!r} is denied")


@dataclass(frozen=True, slots=True)
class _Read:
    """One read attempt: who asks for what, and where its decisions go."""

    state: ServerState
    caller: Caller
    name: str
    stage: str | None
    version: str | None

    def decided(self, allowed: bool) -> None:
        metrics = self.state.metrics
        decision = "allow" if allowed else "deny"
        metrics.child(metrics.access_decisions, self.caller.listener, decision).inc()

    def record(
        self,
        event: str,
        outcome: str,
        reason: str,
        *,
        version: str | None = None,
        stage: str | None = None,
        required: bool = False,
    ) -> None:
        self.state.audit.record(
            event,
            caller=self.caller,
            secret=self.name,
            version=version or self.version,
            stage=stage or self.stage,
            outcome=outcome,
            reason=reason,
            required=required,
        )

    def check_name(self) -> None:
        """Before any lookup: may this caller read this name at all?"""
        decision = self.state.policy.check(self.caller, self.name)
        if not decision.allowed:
            self.decided(False)
            held = "held" if self.state.cache.stage_map(self.name) is not None else "not held"
            self.record("denied", "denied", f"{decision.reason} (secret {held} by the agent)")
            raise _denied(self.name)

    async def lookup(self) -> Lookup:
        """The cache read; a failure is counted (the name was allowed) and audited."""
        stage = None if self.version else self.stage
        try:
            return await self.state.cache.get(self.name, stage=stage, version=self.version)
        except NotFound as exc:
            self.decided(True)
            self.record("not_found", "not_found", exc.code)
            raise
        except AgentError as exc:
            self.decided(True)
            self.record("read", "error", exc.code)
            raise

    def release(self, secret: Secret) -> None:
        """After the lookup: check the stage(s), then audit the read before it is served."""
        if self.version is not None and self.stage is not None and self.stage not in secret.stages:
            self.decided(True)
            self.record("not_found", "not_found", "stage_mismatch")
            raise StageMismatch(
                f"version {self.version!r} of {self.name!r} does not carry stage {self.stage!r}"
            )
        stages = secret.stages if self.version is not None else (self.stage or CURRENT,)
        decision = self.state.policy.check(self.caller, self.name, stages)
        self.decided(decision.allowed)
        if not decision.allowed:
            self.record("denied", "denied", decision.reason, version=secret.version_id)
            raise _denied(self.name)
        self.record(
            "read",
            "allowed",
            decision.reason,
            version=secret.version_id,
            stage=self.stage or (None if self.version else CURRENT),
            required=True,
        )


async def read_secret(
    request: web.Request,
    name: str,
    *,
    stage: str | None = None,
    version: str | None = None,
    refresh: bool = False,
) -> Lookup:
    """Check access, read ``name`` at ``stage`` or ``version`` from the cache, audit it.

    Raises:
        BadRequest: a malformed name, stage or version id (not audited: no
            secret was named), or :class:`StageMismatch`.
        AccessDenied: no rule lets this caller read this name (and stage).
        NotFound, BackendUnavailable, DecryptionError: from the cache.
        AuditUnavailable: the read could not be audited; nothing is released.
    """
    state = request.app[STATE]
    validate_name(name)
    stage = normalize_stage(stage) if stage is not None else None
    if version is not None:
        validate_version_id(version)
    read = _Read(state, caller_of(request), name, stage, version)
    read.check_name()
    if refresh:
        # A failed check is not an error here: the read below reports the secret's state.
        with contextlib.suppress(AgentError):
            await state.cache.refresh(name, trigger="request", force=True)
    lookup = await read.lookup()
    read.release(lookup.secret)
    await state.audit.sync()
    return lookup
