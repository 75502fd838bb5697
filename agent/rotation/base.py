"""The rotator protocol: the part of a rotation that knows the target system.

A rotation follows Secrets Manager's four steps. The engine owns the store
side (step 1's write of the PENDING version, and step 4's stage move); a
rotator owns the target system:

1. ``create``: make the new value. The engine seals it as version ``token``
   with the stage PENDING. Not called again once PENDING holds ``token``.
2. ``set``: apply the pending value to the target (e.g. ``ALTER ROLE``).
3. ``test``: prove the pending value works (e.g. log in, ``SELECT 1``).
4. finish: the engine moves PENDING to CURRENT and the old CURRENT to
   PREVIOUS in one stage-map compare-and-swap; rotators take no part.

Every step must be idempotent: after a crash or a failure the engine calls the
failed step again with the same token and the same pending value.

Errors, and what they mean:

* :class:`~agent.errors.BackendUnavailable` - transient (target unreachable):
  the rotation is retried with backoff from the same step.
* :class:`RotationFailed` - the step failed for a reason a retry will not fix
  by itself (bad credentials, a command that exited non-zero); the rotation is
  recorded as failed and resumed from that step at the next attempt.
* Anything else is a bug in the rotator; the engine treats it as
  :class:`RotationFailed` and logs it once with the secret and step.

No message may contain a secret value.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from agent.errors import AgentError
from agent.types import SecretValue

#: Rotators by name, imported lazily (see :func:`agent.registry.load_backend`).
ROTATORS: Mapping[str, str] = {
    "random": "agent.rotation.random:RandomRotator",
    "command": "agent.rotation.command:CommandRotator",
    "postgres": "agent.rotation.postgres:PostgresRotator",
}

#: The steps, in order; also the ``step`` label of the rotation metrics.
STEPS = ("create", "set", "test", "finish")


class RotationFailed(AgentError):
    """A rotation step failed; CURRENT is untouched and the rotation resumable."""

    code = "rotation_failed"
    status = 409

    def __init__(self, message: str, *, step: str = "") -> None:
        super().__init__(message)
        self.step = step


@dataclass(frozen=True, slots=True)
class RotationContext:
    """What a rotator sees of one rotation.

    Attributes:
        name: the secret being rotated.
        token: the rotation token, which is the PENDING version's id.
        current: the CURRENT value, or None when the secret has none yet.
        current_version: the CURRENT version id, or None.
        pending: the PENDING value; None only during ``create``.
        params: the rule's ``params`` (or the CLI's), validated by the rotator.
        read_secret: reads another secret's CURRENT value by name (for
            example the admin credentials of the PostgreSQL rotator).
    """

    name: str
    token: str
    current: SecretValue | None
    current_version: str | None
    pending: SecretValue | None
    params: Mapping[str, Any] = field(default_factory=dict)
    read_secret: Callable[[str], Awaitable[SecretValue]] | None = field(
        default=None, repr=False, compare=False
    )


@runtime_checkable
class Rotator(Protocol):
    """Creates, applies and tests new values of one kind of secret.

    A rotator is built once per rule with ``Rotator(params)``; bad params raise
    :class:`~agent.errors.ConfigError` naming the parameter. Its methods are
    called with a fresh :class:`RotationContext` per step.
    """

    async def create(self, ctx: RotationContext) -> bytes:
        """Return the new value (the engine stores it as PENDING)."""
        ...

    async def set(self, ctx: RotationContext) -> None:
        """Apply ``ctx.pending`` to the target system (idempotent)."""
        ...

    async def test(self, ctx: RotationContext) -> None:
        """Prove ``ctx.pending`` works on the target; raise if it does not."""
        ...

    async def aclose(self) -> None:
        """Release connections."""
        ...
