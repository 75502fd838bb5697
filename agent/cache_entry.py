"""What the secret cache holds: one entry per secret, and a lookup's answer."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from agent.stores.base import StageState
from agent.types import CURRENT, Secret, stages_of


@dataclass(frozen=True, slots=True)
class Lookup:
    """A cache answer: the secret, whether it is stale, and its age in seconds."""

    secret: Secret
    stale: bool = False
    age: float = 0.0


CURRENT_ONLY = frozenset({CURRENT})


@dataclass(slots=True)
class Entry:
    """One cached secret. Kept small (there may be 50,000): rarely used parts are
    None or shared until first needed, times are floats (formatted on demand)."""

    name: str
    state: StageState
    versions: dict[str, Secret]
    confirmed_at: float  # monotonic time of the last successful version check
    wanted: frozenset[str] = CURRENT_ONLY
    extra: OrderedDict[str, Secret] | None = None
    failing_since: float | None = None
    last_error: str | None = None
    last_refresh: float | None = None  # wall-clock time of the last successful check
    missing_since: float | None = None
    refused: dict[str, str] | None = None  # version id -> envelope digest
    last_forced: float = float("-inf")

    def install(self, state: StageState, versions: dict[str, Secret]) -> None:
        """Hold ``versions`` under the changed map ``state``."""
        self.state = state
        self.versions = versions
        if self.extra:
            self.extra = OrderedDict(
                (v, s.with_stages(stages_of(state.stages, v))) for v, s in self.extra.items()
            )
        if not self.refused:
            self.refused = None

    def status(self, now: float) -> dict[str, Any]:
        """This entry in ``/v1/status`` (versions and times, never values)."""
        return {
            "name": self.name,
            "version_id": self.state.stages.get(CURRENT),
            "stages": dict(self.state.stages),
            "age_seconds": round(now - self.confirmed_at, 3),
            "last_refresh": _iso(self.last_refresh),
            "stale": self.failing_since is not None,
            "last_error": self.last_error,
        }


def _iso(wall: float | None) -> str | None:
    return None if wall is None else datetime.fromtimestamp(wall, UTC).isoformat()


def restaged(held: dict[str, Secret], state: StageState) -> dict[str, Secret]:
    """The ``held`` versions that ``state`` still stages, relabelled with their stages.

    So the old CURRENT, now PREVIOUS, costs nothing to keep.
    """
    staged = set(state.stages.values())
    return {
        vid: secret.with_stages(stages_of(state.stages, vid))
        for vid, secret in held.items()
        if vid in staged
    }
