"""Master keys on a schedule: ``keys.<name>.rotate_every``, like KMS automatic rotation.

For the local keyring and PKCS#11 the agent itself adds a new primary key
version once the current one is older than ``rotate_every``; old versions keep
unwrapping, so nothing needs re-encrypting (``reencrypt`` stays optional). For
AWS KMS the schedule is KMS's own: the agent turns on automatic rotation with
that period (whole days, 90 to 2560) and KMS rotates the material under the
same ARN.

A key version's age comes from the provider (``KeyInfo.created_at``) where it
records one; otherwise from when this agent first saw that version primary, so a
restart can only delay a rotation, never bring one forward.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from datetime import datetime

from agent.audit import Auditor
from agent.crypto.datakeys import DataKeys
from agent.errors import AgentError
from agent.keys.base import KeyInfo, KeyManager, KeyProvider
from agent.metrics import Metrics

log = logging.getLogger(__name__)

#: How often the schedule is checked at most, so a short test period still works.
_MIN_CHECK = 1.0
_MAX_CHECK = 60.0


def _created(info: KeyInfo) -> float | None:
    """``info.created_at`` as epoch seconds, or None when absent or unparsable."""
    if not info.created_at:
        return None
    try:
        return datetime.fromisoformat(info.created_at.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


class KeyRotation:
    """Rotates each scheduled provider's master key when its primary version is due."""

    def __init__(
        self,
        providers: Mapping[str, KeyProvider],
        schedules: Mapping[str, float],
        datakeys: DataKeys,
        *,
        metrics: Metrics,
        audit: Auditor,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.providers = dict(providers)
        self.schedules = dict(schedules)
        self.datakeys = datakeys
        self.metrics = metrics
        self.audit = audit
        self._clock = clock
        #: (provider, key, version) -> when first seen primary, for providers without dates.
        self._first_seen: dict[tuple[str, str, str], float] = {}
        self._native_enabled: set[str] = set()
        self.last_error: dict[str, str | None] = dict.fromkeys(self.schedules)
        self.next_due: dict[str, float | None] = dict.fromkeys(self.schedules)

    @property
    def interval(self) -> float:
        """Seconds between checks: a tenth of the shortest period, within [1 s, 60 s]."""
        shortest = min(self.schedules.values(), default=_MAX_CHECK * 10)
        return min(_MAX_CHECK, max(_MIN_CHECK, shortest / 10))

    async def check_once(self) -> None:
        """Rotate every provider whose primary key version is due (failures are isolated)."""
        for name, provider in self.providers.items():
            every = self.schedules.get(name)
            if every is None or not isinstance(provider, KeyManager):
                continue
            try:
                await self._check(name, provider, every)
            except AgentError as exc:
                self._failed(name, exc.message)

    async def _check(self, name: str, provider: KeyManager, every: float) -> None:
        native = getattr(provider, "schedule_rotation", None)
        if callable(native):  # KMS rotates its own material on the period we set
            if name not in self._native_enabled:
                await native(every)
                self._native_enabled.add(name)
                log.info("key provider %r: automatic rotation every %.0f days", name, every / 86400)
            self.last_error[name] = None
            return
        primary = next((i for i in await provider.list_keys() if i.primary), None)
        if primary is None:
            raise AgentError(f"key provider {name!r} has no primary key version to rotate")
        now = self._clock()
        seen = self._first_seen.setdefault((name, primary.key, primary.version), now)
        created = _created(primary) or seen
        due = created + every
        if now < due:
            self.next_due[name] = due
            self.metrics.key_rotation_next.labels(name).set(due)
            return
        info = await provider.rotate_key()
        self.datakeys.retire_write_keys()
        self._first_seen[(name, info.key, info.version)] = now
        self.next_due[name] = now + every
        self.last_error[name] = None
        self.metrics.key_rotations.labels(name, "ok").inc()
        self.metrics.key_rotation_next.labels(name).set(now + every)
        self.audit.record("key_rotated", outcome="ok", reason=f"{name}/{info.key} v{info.version}")
        log.info(
            "master key %s/%s rotated on schedule: version %s is primary; "
            "older versions keep decrypting",
            name,
            info.key,
            info.version,
        )

    def _failed(self, name: str, message: str) -> None:
        if self.last_error.get(name) != message:
            log.warning("scheduled rotation of key provider %r failed: %s", name, message)
        self.last_error[name] = message
        self.metrics.key_rotations.labels(name, "error").inc()
        self.audit.record("key_rotated", outcome="error", reason=f"{name}: {message[:200]}")

    def status(self) -> dict[str, object]:
        """For ``/v1/status``: each scheduled provider's next rotation and last error."""
        return {
            "key_rotation": [
                {
                    "provider": name,
                    "every_seconds": every,
                    "next_due": self.next_due.get(name),
                    "last_error": self.last_error.get(name),
                }
                for name, every in self.schedules.items()
            ]
        }

    async def run(self) -> None:
        """Check the schedules until cancelled."""
        while True:
            await self.check_once()
            await asyncio.sleep(self.interval)
