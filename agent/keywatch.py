"""Watch master-key state, so values hanging on a revoked key stop being served.

A value the agent decrypted stays in memory; without a look at the key it would
be served forever after its master key was disabled or deleted. Every
``interval`` the state of each provider's keys is read (``keys list``); a key
seen disabled, deleted or missing is marked revoked in the data-key layer, and
the cache stops serving values whose every recipient has been revoked for
longer than ``datakeys.max_age``, the time a cached data key would have kept
them readable anyway. A key that comes back (re-enabled) is usable again.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping

from agent.crypto.datakeys import DataKeys
from agent.errors import AgentError
from agent.keys.base import KeyManager, KeyProvider
from agent.metrics import Metrics

log = logging.getLogger(__name__)
REVOKED_STATES = frozenset({"disabled", "deleted", "missing"})


class KeyWatch:
    """Periodic key-state checks feeding :class:`DataKeys`."""

    def __init__(
        self,
        providers: Mapping[str, KeyProvider],
        datakeys: DataKeys,
        *,
        metrics: Metrics,
        interval: float | None = None,
    ) -> None:
        self.providers = dict(providers)
        self.datakeys = datakeys
        self.metrics = metrics
        self.interval = (
            interval if interval is not None else min(60.0, max(0.5, datakeys.max_age / 4))
        )
        self._revoked: set[tuple[str, str]] = set()

    async def check_once(self) -> None:
        """Read every provider's key states once (a failing provider is skipped)."""
        for name, provider in self.providers.items():
            if not isinstance(provider, KeyManager):
                continue
            try:
                infos = await provider.list_keys()
            except AgentError as exc:
                log.debug("key state of provider %r unknown: %s", name, exc.message)
                continue
            for info in infos:
                key = (name, info.key)
                if info.state in REVOKED_STATES:
                    self.datakeys.mark_revoked(name, info.key)
                    if key not in self._revoked:
                        log.warning(
                            "master key %s/%s is %s: values that depend on it only "
                            "stop being served after datakeys.max_age (%.0fs)",
                            name,
                            info.key,
                            info.state,
                            self.datakeys.max_age,
                        )
                    self._revoked.add(key)
                elif info.state == "enabled":
                    self.datakeys.mark_usable(name, info.key)
                    if key in self._revoked:
                        log.info("master key %s/%s is usable again", name, info.key)
                    self._revoked.discard(key)
        self.metrics.keys_revoked.set(len(self._revoked))

    async def run(self) -> None:
        """Check every ``interval`` until cancelled."""
        while True:
            await self.check_once()
            await asyncio.sleep(self.interval)
