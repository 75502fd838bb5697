"""Secret sources for rendering outside the daemon: the store itself, or the cache."""

from __future__ import annotations

from agent.cache import SecretCache
from agent.core import Core
from agent.errors import VersionNotFound
from agent.types import CURRENT, Secret, normalize_stage, stages_of


class StoreSource:
    """Reads and decrypts straight from the store (``render --once``, ``exec``)."""

    def __init__(self, core: Core) -> None:
        self.core = core

    async def get(
        self, name: str, *, stage: str | None = None, version: str | None = None
    ) -> Secret:
        state = await self.core.store.read_stages(name)
        if version is None:
            wanted = normalize_stage(stage or CURRENT)
            version = state.stages.get(wanted)
            if version is None:
                raise VersionNotFound(f"secret {name!r} has no version at stage {wanted!r}")
        return await self.core.resolver.fetch(
            name, version, stages=stages_of(state.stages, version)
        )


class CacheSource:
    """Reads through the agent's cache."""

    def __init__(self, cache: SecretCache) -> None:
        self.cache = cache

    async def get(
        self, name: str, *, stage: str | None = None, version: str | None = None
    ) -> Secret:
        return (await self.cache.get(name, stage=stage, version=version)).secret
