"""Re-encryption: rewrap every version's data key under the current master keys.

Only data keys are unwrapped and wrapped again; payloads are never decrypted,
and a version's id, payload and stages never change (``keys`` sits outside
the envelope's AAD). Each envelope is swapped with the store's compare-and-swap
(``replace_envelope``), so running agents keep serving throughout and a
concurrent writer is never overwritten. Versions already in the target state
are skipped, so an interrupted run is resumed by running it again.

Cost: one unwrap per distinct data key (``DataKeys`` caches the rest; with
data-key reuse that is about one per ``max_messages`` versions) and one wrap per
distinct data key and target provider whose recipient is missing or not
current. Recipients already current are kept as they are.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from agent.core import Core
from agent.crypto.envelope import WrappedKey, dumps, parse, wrap_context
from agent.errors import BadRequest, Conflict, DecryptionError, NotFound
from agent.types import CURRENT

#: How many failed versions a report names (the count is always complete).
_NAMED_FAILURES = 20


@dataclass
class ReencryptReport:
    """What a run did (counts and names, never key material)."""

    versions: int = 0
    rewrapped: int = 0
    skipped: int = 0
    conflicts: int = 0
    gone: int = 0
    failed: int = 0
    failures: list[str] = field(default_factory=list)
    datakey_lookups: int = 0
    wraps: dict[str, int] = field(default_factory=dict)
    #: Stage maps without proof (written before proofs existed) signed in place.
    signed: int = 0
    #: Stage maps without proof left unsigned (``store.accept_unproven_stages`` is off).
    unproven: int = 0

    @property
    def complete(self) -> bool:
        """Whether every version seen is now in the target state."""
        return not (self.conflicts or self.failed)


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
        # (sha256 of the DEK, provider) -> its new recipient: one wrap per data key.
        self._wrapped: dict[tuple[bytes, str], WrappedKey] = {}

    async def _current(self, wrapped: WrappedKey) -> bool:
        provider = self.core.providers.get(wrapped.provider)
        check = getattr(provider, "is_current", None)
        return True if check is None else bool(await check(wrapped))

    async def _plan(self, keys: Sequence[WrappedKey]) -> list[WrappedKey | str] | None:
        """Per target, the recipient to keep or the provider to wrap for; None: nothing to do."""
        plan: list[WrappedKey | str] = []
        for target in self.targets:
            found = next((k for k in keys if k.provider == target), None)
            keep = found is not None and await self._current(found)
            plan.append(found if keep and found is not None else target)
        if len(keys) == len(plan) and all(isinstance(p, WrappedKey) for p in plan):
            return None
        return plan

    async def _wrap(self, dek: bytes, target: str) -> WrappedKey:
        digest = hashlib.sha256(dek).digest()
        cached = self._wrapped.get((digest, target))
        if cached is None:
            context = wrap_context(self.core.store.store_id)
            cached = await self.core.providers[target].wrap(dek, context=context)
            self._wrapped[(digest, target)] = cached
            self.report.wraps[target] = self.report.wraps.get(target, 0) + 1
        return cached

    async def one(self, name: str, version_id: str) -> None:
        """Bring one version to the target recipients (or count why not).

        Raises:
            BackendUnavailable: the store or every provider able to unwrap is
                unreachable; stop here, a later run resumes.
        """
        store = self.core.store
        try:
            stored = await store.read_version(name, version_id)
        except NotFound:
            self.report.gone += 1  # deleted since it was listed
            return
        self.report.versions += 1
        try:
            envelope = parse(stored.envelope, where=f"secret {name!r} version {version_id!r}")
            plan = await self._plan(envelope.keys)
            if plan is None:
                self.report.skipped += 1
                return
            dek = await self.core.datakeys.unwrap(envelope.keys, store_id=store.store_id)
            self.report.datakey_lookups += 1
            keys = [p if isinstance(p, WrappedKey) else await self._wrap(dek, p) for p in plan]
            new = dumps(envelope.with_keys(keys))
            await store.replace_envelope(name, version_id, new, expected=stored.envelope)
        except Conflict:
            self.report.conflicts += 1  # changed under us: the next run looks again
            return
        except DecryptionError as exc:  # this version cannot be opened: report it, go on
            self.report.failed += 1
            if len(self.report.failures) < _NAMED_FAILURES:
                self.report.failures.append(f"{name} {version_id}: {exc.message}")
            return
        self.report.rewrapped += 1

    async def run(
        self, names: Sequence[str] | None, *, step: Callable[[], None] | None = None
    ) -> ReencryptReport:
        """Rewrap every version of ``names`` (every secret if None).

        Raises:
            BackendUnavailable: stopped early (transient); what was done stays done.
        """
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
            await self.sign(name)
        return self.report

    async def sign(self, name: str) -> None:
        """Give an unproven stage map (from before proofs existed) a proof, as it stands.

        This is the upgrade step: it vouches for the map as it is now, so check
        it first (``describe``). A map that moved meanwhile is left to a next run.
        Only while ``store.accept_unproven_stages`` is on: otherwise a map
        without proof is a store writer's edit (its proof dropped) as likely as
        an old one, and a routine re-encryption must not vouch for it.
        """
        if getattr(self.core.store, "plaintext", False):
            return
        try:
            state = await self.core.store.read_stages(name)
        except NotFound:
            return
        current = state.stages.get(CURRENT)
        if state.proof is not None or current is None:
            return
        if not self.core.config.store.accept_unproven_stages:
            self.report.unproven += 1
            return
        try:
            await self.core.writer().promote(name, CURRENT, current)
        except Conflict:
            self.report.conflicts += 1
            return
        self.report.signed += 1
