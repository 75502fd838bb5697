"""Re-encryption: rewrap every version's data key under the current master keys.

Only data keys are unwrapped and wrapped again; payloads are never decrypted,
and a version's id, payload and stages never change (``keys`` sits outside
the envelope's AAD). Each envelope is swapped with the store's compare-and-swap
(``replace_envelope``), so running agents keep serving throughout and a
concurrent writer is never overwritten. Versions already in the target state
are skipped, so an interrupted run is resumed by running it again.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from agent.core import Core
from agent.crypto.envelope import WrappedKey, dumps, parse, wrap_context
from agent.errors import BadRequest, Conflict, NotFound


@dataclass
class ReencryptReport:
    """What a run did (counts only)."""

    versions: int = 0
    rewrapped: int = 0
    skipped: int = 0
    conflicts: int = 0
    datakey_lookups: int = 0
    wraps: dict[str, int] = field(default_factory=dict)


def target_recipients(core: Core, *, add: Sequence[str], remove: Sequence[str]) -> list[str]:
    """The providers every envelope should end up with, in order."""
    targets = [p for p in core.config.write_keys if p not in remove]
    targets += [p for p in add if p not in targets and p not in remove]
    for name in [*targets, *remove]:
        if name not in core.providers:
            raise BadRequest(f"no key provider {name!r} under 'keys'")
    if not targets:
        raise BadRequest("re-encryption would leave envelopes with no recipient")
    return targets


class Reencryptor:
    """Rewraps envelopes of one store for a list of target providers."""

    def __init__(self, core: Core, targets: Sequence[str]) -> None:
        self.core = core
        self.targets = list(targets)
        self.report = ReencryptReport()
        self._wrapped: dict[tuple[bytes, str], WrappedKey] = {}

    async def _current(self, wrapped: WrappedKey) -> bool:
        provider = self.core.providers.get(wrapped.provider)
        check = getattr(provider, "is_current", None)
        return True if check is None else bool(await check(wrapped))

    async def _desired(self, keys: Sequence[WrappedKey]) -> list[WrappedKey] | None:
        """The recipients to keep, or None if the envelope is already as wanted."""
        keep = []
        for target in self.targets:
            found = next((k for k in keys if k.provider == target), None)
            if found is None or not await self._current(found):
                return None
            keep.append(found)
        return keep if len(keep) == len(keys) else None

    async def one(self, name: str, version_id: str) -> None:
        store = self.core.store
        stored = await store.read_version(name, version_id)
        envelope = parse(stored.envelope, where=f"secret {name!r} version {version_id!r}")
        self.report.versions += 1
        if await self._desired(envelope.keys) is not None:
            self.report.skipped += 1
            return
        dek = await self.core.datakeys.unwrap(envelope.keys, store_id=store.store_id)
        self.report.datakey_lookups += 1
        digest = hashlib.sha256(dek).digest()
        new_keys = []
        for target in self.targets:
            cached = self._wrapped.get((digest, target))
            if cached is None:
                cached = await self.core.providers[target].wrap(
                    dek, context=wrap_context(store.store_id)
                )
                self._wrapped[(digest, target)] = cached
                self.report.wraps[target] = self.report.wraps.get(target, 0) + 1
            new_keys.append(cached)
        try:
            await store.replace_envelope(
                name, version_id, dumps(envelope.with_keys(new_keys)), expected=stored.envelope
            )
        except Conflict:
            self.report.conflicts += 1  # changed under us: the next run looks again
            return
        self.report.rewrapped += 1

    async def run(
        self, names: Sequence[str] | None, *, step: Callable[[], None] | None = None
    ) -> ReencryptReport:
        """Rewrap every version of ``names`` (every secret if None)."""
        store = self.core.store
        for name in names if names is not None else await store.list_names():
            try:
                versions = await store.list_versions(name)
            except NotFound:
                continue
            for version_id, _ in versions:
                await self.one(name, version_id)
                if step is not None:
                    step()
        return self.report
