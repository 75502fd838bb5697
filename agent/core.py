"""The parts every command needs: key providers, data keys, the store, the resolver."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable
from dataclasses import dataclass

from agent.config import AgentConfig
from agent.crypto.datakeys import DataKeys
from agent.keys import KeyProvider, create_provider
from agent.metrics import Metrics
from agent.resolver import Resolver
from agent.retention import RetentionPolicy
from agent.stageguard import StageGuard
from agent.stores import WritableStore, create_store
from agent.writer import SecretWriter

log = logging.getLogger(__name__)

#: How long closing one part (a store's channel, a provider's session) may take
#: before shutdown goes on without it: a peer that stopped answering must not
#: hold the process up.
CLOSE_TIMEOUT = 10.0


@dataclass
class Core:
    """Key providers, data keys, store and resolver built from one config."""

    config: AgentConfig
    metrics: Metrics
    providers: dict[str, KeyProvider]
    datakeys: DataKeys
    store: WritableStore
    resolver: Resolver

    @classmethod
    def build(cls, config: AgentConfig, *, metrics: Metrics | None = None) -> Core:
        """Create every part (no network or disk I/O happens until first use)."""
        metrics = metrics or Metrics()
        providers = {
            name: create_provider(name, cfg, config=config, metrics=metrics)
            for name, cfg in config.keys.items()
        }
        datakeys = DataKeys(
            providers,
            write_keys=config.write_keys if providers else (),
            settings=config.datakeys,
            metrics=metrics,
        )
        store = create_store(config, metrics=metrics)
        guard = StageGuard(
            store,
            datakeys,
            metrics=metrics,
            accept_unproven=config.store.accept_unproven_stages,
        )
        resolver = Resolver(store, datakeys, metrics=metrics, guard=guard)
        return cls(config, metrics, providers, datakeys, store, resolver)

    def writer(self) -> SecretWriter:
        retention = self.config.retention
        return SecretWriter(
            self.store,
            self.datakeys,
            retention=RetentionPolicy(retention.keep_unstaged, retention.max_age),
            accept_unproven=self.config.store.accept_unproven_stages,
        )

    async def aclose(self) -> None:
        """Close the store, wipe data keys, close providers (each bounded in time)."""
        await _bounded("the store", self.store.aclose())
        await self.datakeys.aclose()
        for name, provider in self.providers.items():
            await _bounded(f"key provider {name!r}", provider.aclose())


async def _bounded(what: str, closing: Awaitable[None]) -> None:
    try:
        async with asyncio.timeout(CLOSE_TIMEOUT):
            await closing
    except TimeoutError:
        log.warning("closing %s took over %.0fs; going on without it", what, CLOSE_TIMEOUT)
