"""The store protocols, shared by every backing store.

A store keeps, per secret name, immutable versions (each an envelope, opaque
bytes to the store) and one stage map (``{"CURRENT": "<id>", ...}``) carrying a
``revision`` that changes whenever the map changes. The revision is the cheap
version check: comparing it costs one small read, never a fetch and decrypt.

Errors, and what they mean:

* :class:`~agent.errors.BackendUnavailable` - transient (unreachable, timeout,
  throttled, 5xx): retry with backoff; stale-if-error applies.
* :class:`~agent.errors.SecretNotFound` / :class:`~agent.errors.VersionNotFound`
  - the name or version does not exist.
* :class:`~agent.errors.AccessDenied` - the store refused us: permanent.
* :class:`~agent.errors.Conflict` - a write lost a race; nothing was changed.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Protocol, runtime_checkable

from agent.errors import (
    AgentError,
    BackendUnavailable,
    BadRequest,
    Conflict,
    InvalidName,
    NotFound,
)
from agent.types import STAGE_ALIASES, normalize_stage, validate_name, validate_version_id


def check_store_name(name: str, *, store: str, reserved: frozenset[str]) -> str:
    """``name`` if it is valid and none of its path segments is one of the layout's own.

    Raises:
        InvalidName: naming the store and its reserved segments.
    """
    validate_name(name)
    clash = reserved & set(name.split("/"))
    if clash:
        raise InvalidName(
            f"invalid secret name for the {store} store: the path segment "
            f"{min(clash)!r} is reserved by its layout ({', '.join(sorted(reserved))})"
        )
    return name


def name_checker(store: str, reserved: frozenset[str]) -> Callable[[str], str]:
    """A store's ``check_name``: :func:`check_store_name` with its layout's reserved segments."""

    def check_name(name: str) -> str:
        """``name`` if it is valid and cannot collide with the layout's own path segments."""
        return check_store_name(name, store=store, reserved=reserved)

    return check_name


def check_stage_map(stages: Mapping[str, str]) -> dict[str, str]:
    """A plain copy of a stage map to store; labels must be normalised, version ids valid.

    Raises:
        BadRequest: an alias (``AWSCURRENT``) or unnormalised label, or a bad version id.
    """
    for stage, version_id in stages.items():
        if stage in STAGE_ALIASES or normalize_stage(stage) != stage:
            raise BadRequest(f"stage labels are stored normalised, got {stage!r}")
        validate_version_id(version_id)
    return dict(stages)


def store_outcome(err: AgentError) -> str:
    """The ``outcome`` label of a failed store call in ``secrets_agent_store_operations_total``."""
    if isinstance(err, NotFound):
        return "not_found"
    if isinstance(err, BackendUnavailable):
        return "unavailable"
    if isinstance(err, Conflict):
        return "conflict"
    return "error"


@dataclass(frozen=True, slots=True)
class StageState:
    """A secret's stage map and the revision that identifies it.

    ``revision == ""`` means the secret has no stage map yet. ``proof`` is the
    writer's proof for the map (:mod:`agent.crypto.stageproof`), None if it
    carries none; the revision changes with the proof too.
    """

    stages: Mapping[str, str]
    revision: str
    proof: str | None = None
    #: A cheaper change marker than ``revision``, where the store has one (the
    #: file store: inode, mtime, ctime and size of ``stages.json``), else None.
    marker: object = field(default=None, compare=False)

    def version_for(self, stage: str) -> str | None:
        return self.stages.get(stage)


@dataclass(frozen=True, slots=True)
class StoredVersion:
    """One version as the store holds it: an envelope and its creation time."""

    name: str
    version_id: str
    envelope: bytes = field(repr=False)
    created_at: datetime


@dataclass(frozen=True, slots=True)
class WatchEvent:
    """A push from the store: these names changed, or ``names is None``: resync all."""

    names: frozenset[str] | None


@runtime_checkable
class SecretStore(Protocol):
    """The read side, which is all a running agent needs."""

    #: The logical store id from the config (bound into envelope contexts).
    store_id: str

    async def list_names(self) -> list[str]:
        """Every secret name in the store, sorted."""
        ...

    async def read_stages(self, name: str) -> StageState:
        """The stage map of ``name`` (cheap). Raises SecretNotFound."""
        ...

    async def read_version(self, name: str, version_id: str) -> StoredVersion:
        """One version's envelope. Raises SecretNotFound or VersionNotFound."""
        ...

    async def aclose(self) -> None:
        """Close connections."""
        ...


@runtime_checkable
class WritableStore(SecretStore, Protocol):
    """The write side, used by the CLI, rotation and re-encryption."""

    async def list_versions(self, name: str) -> list[tuple[str, datetime]]:
        """Every version id of ``name`` with its creation time, oldest first."""
        ...

    async def write_version(self, name: str, version_id: str, envelope: bytes) -> None:
        """Create a version. Raises Conflict if the id exists (versions are immutable)."""
        ...

    async def replace_envelope(
        self, name: str, version_id: str, envelope: bytes, *, expected: bytes
    ) -> None:
        """Swap a version's envelope for one with other recipients (``reencrypt``).

        Compare-and-swap against ``expected``; raises Conflict if it changed.
        The payload, id and stages never change this way.
        """
        ...

    async def set_stages(
        self,
        name: str,
        stages: Mapping[str, str],
        *,
        expected_revision: str,
        proof: str | None = None,
    ) -> StageState:
        """Replace the stage map (and its ``proof``) atomically if its revision is still
        ``expected_revision``.

        Raises:
            Conflict: someone else changed the map first; nothing was written.
            VersionNotFound: a stage points at a version that does not exist.
        """
        ...

    async def delete_version(self, name: str, version_id: str) -> None:
        """Remove one version that no stage points at (retention).

        Raises:
            Conflict: a stage points at it (checked against the stored map).
            VersionNotFound / SecretNotFound: nothing to delete.
        """
        ...


@runtime_checkable
class BulkWritableStore(Protocol):
    """A store that writes many versions and first stage maps per call, made durable
    together by :meth:`sync` (``import``): one sync per batch instead of two per file."""

    async def write_versions_many(
        self, items: Sequence[tuple[str, str, bytes]]
    ) -> list[Exception | None]: ...

    async def set_stages_many(
        self, items: Sequence[tuple[str, Mapping[str, str], str, str | None]]
    ) -> list[StageState | Exception]: ...

    async def sync(self) -> None: ...


@runtime_checkable
class BatchReadableStore(Protocol):
    """A store that reads many secrets per call (the file store: one thread hop per batch).

    Each answer is the value or the error a single call would have raised,
    in the order asked.
    """

    async def read_stages_many(self, names: Sequence[str]) -> list[StageState | Exception]:
        """:meth:`SecretStore.read_stages` of each name."""
        ...

    async def read_versions_many(
        self, wanted: Sequence[tuple[str, str]]
    ) -> list[StoredVersion | Exception]:
        """:meth:`SecretStore.read_version` of each (name, version id)."""
        ...

    async def stage_markers_many(self, names: Sequence[str]) -> list[object]:
        """The :attr:`StageState.marker` each name's stage map has now (None if unknown).

        Much cheaper than reading the maps (a stat each); a marker equal to
        the one last read means the map is unchanged.
        """
        ...


@runtime_checkable
class WatchableStore(Protocol):
    """A store that can push changes (file: watchfiles, etcd: watch)."""

    def watch(self) -> AsyncIterator[WatchEvent]:
        """Yield change events until cancelled.

        The first event after (re)connecting is ``WatchEvent(None)`` so the
        consumer resynchronises and misses nothing. Raises BackendUnavailable
        when the watch breaks; the caller restarts it with backoff.
        """
        ...
