"""Version retention: keep the staged versions plus the newest unstaged ones.

Rotation and every ``put`` create versions; without pruning a secret rotated
daily holds thousands of envelopes after a few years. A version that a stage
points at (CURRENT, PREVIOUS, PENDING or a custom label) is never pruned.
Unstaged versions are pruned beyond the newest ``keep_unstaged``, and, with
``max_age``, once they are older than that.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta

from agent.errors import AgentError, Conflict, NotFound
from agent.stores.base import WritableStore

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class RetentionPolicy:
    """How many unstaged versions to keep, and for how long (None: no limit)."""

    keep_unstaged: int | None = 100
    max_age: float | None = None


def to_prune(
    versions: list[tuple[str, datetime]],
    stages: Mapping[str, str],
    policy: RetentionPolicy,
    *,
    now: datetime,
) -> list[str]:
    """The version ids ``policy`` prunes, oldest first (``versions`` oldest first)."""
    staged = set(stages.values())
    unstaged = [(vid, created) for vid, created in versions if vid not in staged]
    doomed: list[str] = []
    keep = policy.keep_unstaged
    cutoff = now - timedelta(seconds=policy.max_age) if policy.max_age is not None else None
    for index, (vid, created) in enumerate(unstaged):
        newer = len(unstaged) - index - 1  # unstaged versions newer than this one
        if (keep is not None and newer >= keep) or (cutoff is not None and created < cutoff):
            doomed.append(vid)
    return doomed


async def prune(
    store: WritableStore,
    name: str,
    policy: RetentionPolicy,
    *,
    now: datetime,
    dry_run: bool = False,
) -> list[str]:
    """Delete the versions of ``name`` that ``policy`` prunes; return their ids.

    A version staged in the meantime is skipped (the store refuses with
    Conflict); one already gone is skipped too.
    """
    stages = (await store.read_stages(name)).stages
    doomed = to_prune(await store.list_versions(name), stages, policy, now=now)
    if dry_run:
        return doomed
    pruned = []
    for vid in doomed:
        try:
            await store.delete_version(name, vid)
        except (Conflict, NotFound):
            continue
        pruned.append(vid)
    return pruned


async def prune_quietly(
    store: WritableStore, name: str, policy: RetentionPolicy, *, now: datetime
) -> None:
    """:func:`prune` after a write: a failure is logged, never raised (the write stands)."""
    try:
        await prune(store, name, policy, now=now)
    except AgentError as exc:
        log.warning("retention: could not prune old versions of %r: %s", name, exc.message)
