"""Deleting a secret with a recovery window, restoring it, and purging it for good.

As in Secrets Manager, ``delete NAME`` does not remove anything at once: the
secret is *scheduled for deletion*. Readers (agents, ``get``) treat it as
gone, writes to it (``put``, ``promote``, rotation) are refused, and until
the recovery window ends ``restore NAME`` puts every stage back where it was.
After the window, ``prune`` purges it: every version is removed and a
tombstone is left, so the name can be used again by a later ``put``.

The deletion is recorded in the stage map itself, so it needs nothing from a
store but what every writable store has, and it is authenticated like every
other stage move (the writer's proof; a store writer without master keys can
neither delete nor restore a secret for the agents):

* each label ``L`` is moved to ``DELETED.L`` (same version), so every staged
  version is kept by retention and restore is one compare-and-swap back;
* ``DELETED.UNTIL.<unix seconds>`` marks the end of the recovery window;
* after the purge, the map holds only ``DELETED.PURGED``, on a tombstone
  version whose sealed value is empty of any secret.

A map with any ``DELETED.`` label is a deleted secret; those labels are
reserved (``put --stage`` and ``promote`` refuse them).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from agent.errors import AgentError, BadRequest, Conflict, NotFound, SecretNotFound
from agent.stores.base import StageState
from agent.types import CURRENT

if TYPE_CHECKING:
    from agent.writer import SecretWriter

#: Every label of a deleted secret's stage map starts with this.
PREFIX = "DELETED."
_UNTIL = PREFIX + "UNTIL."
#: The only label of a purged secret's map (on the tombstone version).
PURGED = PREFIX + "PURGED"
#: The sealed value of a tombstone (no secret in it).
TOMBSTONE = b"(purged)"
#: Default recovery window, as Secrets Manager's (30 days).
DEFAULT_WINDOW = 30 * 86400.0


class SecretGone(SecretNotFound):
    """A reader's "not found" for a secret deleted through this module.

    Unlike a secret that merely vanished from the store, the deletion is a
    proven stage move, so running agents drop it at once (no ``delete_grace``).
    """


class SecretDeleted(AgentError):
    """A write to a secret that is scheduled for deletion (restore it first)."""

    code = "secret_deleted"
    status = 409


@dataclass(frozen=True, slots=True)
class Deletion:
    """Where a secret stands: scheduled for deletion until ``until``, or purged."""

    until: float | None
    purged: bool


def deletion_of(stages: Mapping[str, str]) -> Deletion | None:
    """The deletion recorded in ``stages``, or None for a live secret."""
    if not any(label.startswith(PREFIX) for label in stages):
        return None
    if PURGED in stages:
        return Deletion(None, True)
    until = None
    for label in stages:
        if label.startswith(_UNTIL):
            try:
                until = float(label[len(_UNTIL) :])
            except ValueError:
                continue
    return Deletion(until, False)


def is_deleted(stages: Mapping[str, str]) -> bool:
    """True for the map of a secret scheduled for deletion or purged."""
    return any(label.startswith(PREFIX) for label in stages)


def check_label(stage: str) -> str:
    """``stage``, unless it is a reserved deletion label (BadRequest)."""
    if stage.startswith(PREFIX):
        raise BadRequest(f"stage labels starting with {PREFIX!r} are reserved for deletion")
    return stage


def refuse_deleted(name: str, stages: Mapping[str, str]) -> None:
    """Raise :class:`SecretDeleted` if ``stages`` is a deleted secret's map."""
    deletion = deletion_of(stages)
    if deletion is None or deletion.purged:
        return
    raise SecretDeleted(
        f"secret {name!r} is scheduled for deletion{_until_text(deletion)}; "
        "'secrets-agent restore' it first"
    )


def not_found(name: str, deletion: Deletion) -> SecretGone:
    """The reader's error for a deleted secret (no value, no existence beyond the name)."""
    if deletion.purged:
        return SecretGone(f"secret {name!r} was deleted")
    return SecretGone(f"secret {name!r} is scheduled for deletion{_until_text(deletion)}")


def deleted_map(stages: Mapping[str, str], until: float) -> dict[str, str]:
    """The map of a secret scheduled for deletion until ``until`` (Unix seconds)."""
    if not stages:
        raise SecretNotFound("the secret has no staged version")
    moved = {PREFIX + label: vid for label, vid in stages.items()}
    anchor = stages.get(CURRENT) or stages[min(stages)]
    moved[f"{_UNTIL}{int(until)}"] = anchor
    too_long = [label for label in moved if len(label) > 256]
    if too_long:
        raise BadRequest(f"stage label {too_long[0][len(PREFIX) :]!r} is too long to keep")
    return moved


def restored_map(stages: Mapping[str, str]) -> dict[str, str]:
    """The map a restore puts back: every ``DELETED.L`` label as ``L``."""
    return {
        label[len(PREFIX) :]: vid
        for label, vid in stages.items()
        if label.startswith(PREFIX) and not label.startswith(_UNTIL) and label != PURGED
    }


def iso(ts: float) -> str:
    """Unix seconds as ``2026-12-02T05:17:00Z``."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


def _until_text(deletion: Deletion) -> str:
    return "" if deletion.until is None else f" (recoverable until {iso(deletion.until)})"


def _check_store(writer: SecretWriter) -> None:
    if "stage_deletion" in getattr(writer.store, "lacks", ()):
        raise BadRequest(
            "this store cannot record a deletion in the stage map (on AWS Secrets Manager, "
            "AWSCURRENT must always label a version): use AWS's own DeleteSecret and "
            "RestoreSecret (aws secretsmanager delete-secret --recovery-window-in-days N)"
        )


async def delete(
    writer: SecretWriter, name: str, *, window: float, now: float | None = None
) -> float:
    """Schedule ``name`` for deletion ``window`` seconds from now; return the purge time.

    Raises:
        SecretNotFound: no such secret (or it is already deleted).
        SecretDeleted: it is scheduled for deletion already.
        Conflict: the stage map moved meanwhile; nothing was changed.
        BadRequest: the store cannot record a deletion (AWS Secrets Manager).
    """
    _check_store(writer)
    state = await writer.store.read_stages(name)
    deletion = deletion_of(state.stages)
    if deletion is not None:
        if deletion.purged:
            raise SecretNotFound(f"secret {name!r} was deleted already")
        raise SecretDeleted(
            f"secret {name!r} is scheduled for deletion already{_until_text(deletion)}"
        )
    until = (time.time() if now is None else now) + window
    await writer.apply_stages(
        name, deleted_map(state.stages, until), expected_revision=state.revision, lifecycle=True
    )
    return until


async def restore(writer: SecretWriter, name: str, *, now: float | None = None) -> StageState:
    """Put back the stages of a secret scheduled for deletion (within its window).

    Raises:
        SecretNotFound: no such secret, or it was purged.
        BadRequest: it is not scheduled for deletion, or its window has ended.
        Conflict: the stage map moved meanwhile; nothing was changed.
    """
    state = await writer.store.read_stages(name)
    deletion = deletion_of(state.stages)
    if deletion is None:
        raise BadRequest(f"secret {name!r} is not scheduled for deletion")
    if deletion.purged:
        raise SecretNotFound(f"secret {name!r} was deleted for good; nothing to restore")
    now = time.time() if now is None else now
    if deletion.until is not None and now >= deletion.until:
        raise BadRequest(
            f"the recovery window of secret {name!r} ended at {iso(deletion.until)}; "
            "it is due to be purged"
        )
    return await writer.apply_stages(
        name, restored_map(state.stages), expected_revision=state.revision, lifecycle=True
    )


async def purge(writer: SecretWriter, name: str) -> int:
    """Remove every version of ``name`` for good, leaving a tombstone; return how many.

    The caller decides that the window has ended (or that no recovery is
    wanted). Idempotent: a purge cut short is completed by the next one.

    Raises:
        SecretNotFound: no such secret.
        Conflict: the stage map moved meanwhile (e.g. a restore); nothing was purged.
        BadRequest: the store cannot record a deletion (AWS Secrets Manager).
    """
    _check_store(writer)
    state = await writer.store.read_stages(name)
    tomb = state.stages.get(PURGED)
    if tomb is None:
        tomb = f"purged-{uuid.uuid4()}"
        envelope = await writer.seal(name, tomb, TOMBSTONE, "string")
        await writer.store.write_version(name, tomb, envelope)
        await writer.apply_stages(
            name, {PURGED: tomb}, expected_revision=state.revision, lifecycle=True
        )
    removed = 0
    for vid, _ in await writer.store.list_versions(name):
        if vid == tomb:
            continue
        try:
            await writer.store.delete_version(name, vid)
        except (NotFound, Conflict):
            continue
        removed += 1
    return removed


def purge_due(stages: Mapping[str, str], now: float) -> bool:
    """True when the recovery window recorded in ``stages`` has ended (not yet purged)."""
    deletion = deletion_of(stages)
    return (
        deletion is not None
        and not deletion.purged
        and deletion.until is not None
        and now >= deletion.until
    )
