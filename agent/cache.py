"""The secret cache: decrypted versions by name, kept fresh by the Refresher.

No HTTP in here (as in the AWS agent's cache crate). Semantics:

* **Single-flight**: concurrent loads or refreshes of one secret share one
  store round trip and one decrypt.
* **Cheap checks**: a refresh reads the stage map and its revision; only a
  changed map fetches and decrypts, and only versions not already held.
* **Stale only on transient errors**: when the store or a key provider is
  unavailable, the last good value is served, marked stale, up to
  ``max_stale``; then :class:`~agent.errors.StaleTooLong`. Not-found,
  access-denied and decryption errors never fall back to stale data; a
  refused envelope leaves the last good version in service.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from agent import cache_batch
from agent.cache_entry import CURRENT_ONLY as _CURRENT_ONLY
from agent.cache_entry import Entry as _Entry
from agent.cache_entry import Lookup as Lookup
from agent.cache_entry import restaged
from agent.config import RefreshConfig
from agent.deletion import SecretGone
from agent.errors import (
    AgentError,
    BackendUnavailable,
    BadRequest,
    DecryptionError,
    KeyRevoked,
    SecretNotFound,
    StaleTooLong,
    VersionNotFound,
)
from agent.metrics import Metrics
from agent.resolver import Resolver, envelope_digest
from agent.singleflight import SingleFlight
from agent.stores.base import StageState
from agent.types import CURRENT, Secret, normalize_stage, stages_of, validate_name

if TYPE_CHECKING:
    from agent.audit import Auditor

log = logging.getLogger(__name__)
T = TypeVar("T")
_EXTRA_VERSIONS = 8  # versions asked for by id that carry no stage, per secret


ChangeListener = Callable[[str], None]


class SecretCache:
    """Decrypted secrets by name, with single-flight loads and stale-if-error."""

    def __init__(
        self,
        resolver: Resolver,
        *,
        settings: RefreshConfig,
        metrics: Metrics,
        clock: Callable[[], float] = time.monotonic,
        audit: Auditor | None = None,
    ) -> None:
        self.resolver = resolver
        self.audit = audit
        self.settings = settings
        self.metrics = metrics
        self.clock = clock
        self._entries: dict[str, _Entry] = {}
        self._flights = SingleFlight()
        self._listeners: list[ChangeListener] = []
        metrics.cache_stale_age.set_function(self.stale_age)  # computed at each scrape
        self._stale = 0  # entries with failing_since set, kept as they change
        # name -> the removal count when it was last removed: a load that was
        # in flight across a remove() (a reload dropped the name) must not put
        # the entry back.
        self._removed: dict[str, int] = {}
        self._removals = 0
        # Bound once: the read path counts every answer.
        self._answered = {
            False: metrics.cache_requests.labels("hit"),
            True: metrics.cache_requests.labels("stale"),
        }

    # ------------------------------------------------------------------ reads

    async def get(
        self, name: str, *, stage: str | None = None, version: str | None = None
    ) -> Lookup:
        """The secret ``name`` at ``stage`` (default CURRENT) or ``version``.

        Raises:
            InvalidName / BadRequest: bad name, or a version without that stage.
            NotFound: no such secret, stage or version.
            BackendUnavailable: nothing cached and the store is down, or stale
                past ``max_stale`` (:class:`StaleTooLong`).
            DecryptionError: the version's envelope was refused.
        """
        validate_name(name)
        entry = self._entries.get(name)
        if entry is None:
            self.metrics.cache_requests.labels("miss").inc()
            entry = await self._flights.run(("load", name), lambda: self._load(name))
        else:
            self._check_stale(entry)
        stage = normalize_stage(stage) if stage is not None else None
        if version is not None:
            secret = await self._by_version(entry, version)
            if stage is not None and stage not in secret.stages:
                raise BadRequest(f"version {version!r} of {name!r} does not carry stage {stage!r}")
        else:
            secret = await self._by_stage(entry, stage or CURRENT)
        self._check_keys(secret)
        stale = entry.failing_since is not None
        self._answered[stale].inc()
        return Lookup(secret, stale, max(0.0, self.clock() - entry.confirmed_at))

    def names(self) -> list[str]:
        """The names held, sorted."""
        return sorted(self._entries)

    def holds(self, name: str) -> bool:
        """Whether ``name`` is cached (no sort, no copy: for per-event checks)."""
        return name in self._entries

    def held(self) -> list[str]:
        """The names held, unsorted."""
        return list(self._entries)

    def peek(self, name: str) -> Secret | None:
        """The CURRENT version held for ``name``, without any I/O."""
        entry = self._entries.get(name)
        if entry is None:
            return None
        vid = entry.state.stages.get(CURRENT)
        return entry.versions.get(vid) if vid else None

    def stage_map(self, name: str) -> StageState | None:
        entry = self._entries.get(name)
        return entry.state if entry else None

    def subscribe(self, listener: ChangeListener) -> None:
        """Call ``listener(name)`` whenever a held secret's stage map changes."""
        self._listeners.append(listener)

    def status(self) -> list[dict[str, Any]]:
        """Per-secret status for ``/v1/status`` (versions and times, never values)."""
        now = self.clock()
        return [self._entries[name].status(now) for name in sorted(self._entries)]

    def _check_keys(self, secret: Secret) -> None:
        """KeyRevoked once every master key of ``secret`` was revoked over ``max_age`` ago."""
        mine = self.resolver.datakeys.revoked_past_max_age(secret.recipients)
        if not mine:
            return
        self.metrics.cache_requests.labels("revoked").inc()
        names = ", ".join(f"{p}/{k}" for p, k in mine)
        raise KeyRevoked(
            f"secret {secret.name!r} is no longer served: its master key(s) {names} were "
            f"disabled, deleted or denied more than datakeys.max_age "
            f"({self.resolver.datakeys.max_age:.0f}s) ago",
            provider=mine[0][0],
            key=mine[0][1],
        )

    def _check_stale(self, entry: _Entry) -> None:
        if entry.failing_since is None:
            return
        age = self.clock() - entry.confirmed_at
        if age > self.settings.max_stale:
            self.metrics.cache_requests.labels("error").inc()
            raise StaleTooLong(
                f"secret {entry.name!r} could not be refreshed for {age:.0f}s, longer than "
                f"max_stale ({self.settings.max_stale:.0f}s): {entry.last_error}",
                retry_after=self.settings.backoff_initial,
            )

    async def _by_stage(self, entry: _Entry, stage: str) -> Secret:
        vid = entry.state.stages.get(stage)
        if vid is None:
            raise VersionNotFound(f"secret {entry.name!r} has no version at stage {stage!r}")
        secret = entry.versions.get(vid)
        if secret is None:
            # A stage not kept loaded until now (PENDING, a custom label): fetch it
            # and keep it fresh from now on.
            secret = await self._flights.run(
                ("version", entry.name, vid),
                lambda: self.resolver.fetch(
                    entry.name, vid, stages=stages_of(entry.state.stages, vid)
                ),
            )
            if entry.state.stages.get(stage) == vid:
                entry.versions[vid] = secret
                entry.wanted = entry.wanted | {stage}
        return secret

    async def _by_version(self, entry: _Entry, version: str) -> Secret:
        secret = entry.versions.get(version) or (entry.extra.get(version) if entry.extra else None)
        if secret is not None:
            return secret
        secret = await self._flights.run(
            ("version", entry.name, version),
            lambda: self.resolver.fetch(
                entry.name, version, stages=stages_of(entry.state.stages, version)
            ),
        )
        if entry.extra is None:
            entry.extra = OrderedDict()
        entry.extra[version] = secret
        while len(entry.extra) > _EXTRA_VERSIONS:
            entry.extra.popitem(last=False)
        return secret

    # --------------------------------------------------------------- refresh

    async def _load(self, name: str) -> _Entry:
        removed = self._removed.get(name)
        state = await self.resolver.stages(name)
        versions = await self._fetch_wanted(name, state, _CURRENT_ONLY, {})
        entry = _Entry(name, state, versions, self.clock(), last_refresh=time.time())
        if self._removed.get(name) != removed:
            return entry  # removed while loading: answer this caller, hold nothing
        self._entries[name] = entry
        self.metrics.cache_secrets.set(len(self._entries))
        return entry

    async def refresh(self, name: str, *, trigger: str = "poll", force: bool = False) -> bool:
        """One refresh attempt of ``name``: cheap check, then fetch what changed.

        Args:
            force: a client asked (``refresh=true``); rate-limited per secret.

        Returns:
            True if the stage map changed (or the secret was loaded or removed).

        Raises:
            The store's or resolver's error; the entry records it (and turns
            stale on a transient one).
        """
        entry = self._entries.get(name)
        if force and entry is not None:
            now = self.clock()
            if now - entry.last_forced < self.settings.request_min_interval:
                return False
            entry.last_forced = now
        started = self.clock()
        first = entry is None
        try:
            changed: bool = await self._flights.run(("refresh", name), lambda: self._refresh(name))
        except AgentError:
            self.metrics.refreshes.labels(trigger, "error").inc()
            raise
        finally:
            self.metrics.refresh_seconds.observe(self.clock() - started)
        # A first load is not a change: counting it as one would show a
        # rotation for every secret at each start.
        outcome = "loaded" if first and changed else "changed" if changed else "unchanged"
        self.metrics.refreshes.labels(trigger, outcome).inc()
        return changed

    async def _refresh(self, name: str) -> bool:
        entry = self._entries.get(name)
        if entry is None:
            await self._flights.run(("load", name), lambda: self._load(name))
            self._notify(name)
            return True
        try:
            state = await self.resolver.stages(name)
        except SecretNotFound as exc:
            self.metrics.version_checks.labels("error").inc()
            return self._missing(entry, exc)
        except BackendUnavailable as exc:
            self.metrics.version_checks.labels("error").inc()
            self._failing(entry, exc)
            raise
        entry.missing_since = None
        if state.revision == entry.state.revision:
            self.metrics.version_checks.labels("unchanged").inc()
            self._confirmed(entry)
            return False
        self.metrics.version_checks.labels("changed").inc()
        if entry.refused is None:
            entry.refused = {}
        try:
            versions = await self._fetch_wanted(
                name, state, entry.wanted, entry.versions, entry.refused
            )
        except BackendUnavailable as exc:
            self._failing(entry, exc)
            raise
        except AgentError as exc:
            # Refused envelope or vanished version: keep the last good value.
            entry.last_error = exc.message
            raise
        self._install(entry, state, versions)
        self._notify(name)
        return True

    def _install(self, entry: _Entry, state: StageState, versions: dict[str, Secret]) -> None:
        """A changed stage map and its versions are in: serve them from now on."""
        entry.install(state, versions)
        self._confirmed(entry)

    # ---------------------------------------------------------- batched refresh

    async def refresh_batch(self, names: Sequence[str], *, trigger: str) -> list[str]:
        """Refresh ``names`` with two store calls; return those left for :meth:`refresh`.

        See :func:`agent.cache_batch.refresh_batch`.
        """
        return await cache_batch.refresh_batch(self, names, trigger=trigger)

    async def changed_markers(self, names: Sequence[str]) -> list[str]:
        """Of ``names``, those whose stage map may have changed, by the store's cheap markers.

        See :func:`agent.cache_batch.changed_markers`.
        """
        return await cache_batch.changed_markers(self, names)

    async def _fetch_wanted(
        self,
        name: str,
        state: StageState,
        wanted: Iterable[str],
        held: dict[str, Secret],
        refused: dict[str, str] | None = None,
    ) -> dict[str, Secret]:
        """The versions to hold for ``state``.

        Every wanted stage's version (fetched only if not held), plus held
        versions that still carry a stage (:func:`restaged`).
        """
        versions = restaged(held, state)
        for stage in sorted(wanted):
            wanted_vid = state.stages.get(stage)
            if wanted_vid is None or wanted_vid in versions:
                continue
            stages = stages_of(state.stages, wanted_vid)
            versions[wanted_vid] = await self._fetch_once(name, wanted_vid, stages, refused)
        return versions

    async def _fetch_once(
        self, name: str, vid: str, stages: tuple[str, ...], refused: dict[str, str] | None
    ) -> Secret:
        stored = await self.resolver.store.read_version(name, vid)
        digest = envelope_digest(stored.envelope)
        if refused is not None and refused.get(vid) == digest:
            raise DecryptionError(
                f"envelope of secret {name!r} version {vid!r} was refused before "
                "and has not changed"
            )
        self.metrics.fetches.labels("ok").inc()
        try:
            return await self.resolver.open(name, vid, stored.envelope, stored.created_at, stages)
        except DecryptionError as exc:
            log.warning("refused envelope: %s; the last good value stays in service", exc.message)
            if self.audit is not None:
                self.audit.record(
                    "envelope_refused",
                    secret=name,
                    version=vid,
                    outcome="refused",
                    reason=exc.message,
                )
            if refused is not None:
                refused[vid] = digest
            raise

    def _confirmed(self, entry: _Entry) -> None:
        if entry.failing_since is not None:
            log.info(
                "secret %r refreshed again after %.1fs",
                entry.name,
                self.clock() - entry.failing_since,
            )
            entry.failing_since = None
            self._stale_changed(-1)
        entry.last_error = None
        entry.confirmed_at = self.clock()
        entry.last_refresh = time.time()

    def _failing(self, entry: _Entry, exc: AgentError) -> None:
        if entry.failing_since is None:
            entry.failing_since = self.clock()
            self._stale_changed(+1)
        entry.last_error = exc.message

    def _missing(self, entry: _Entry, exc: SecretNotFound) -> bool:
        now = self.clock()
        if isinstance(exc, SecretGone):
            # Deleted by a proven stage move (``secrets-agent delete``), not merely
            # missing: no grace period.
            entry.missing_since = now - self.settings.delete_grace
        if entry.missing_since is None:
            entry.missing_since = now
            log.warning(
                "secret %r is gone from the store; dropping it in %.0fs unless it returns",
                entry.name,
                self.settings.delete_grace,
            )
        if now - entry.missing_since < self.settings.delete_grace:
            return False
        self.remove(entry.name)
        self.metrics.secrets_removed.inc()
        log.warning("secret %r removed from the agent: deleted from the store", entry.name)
        self._notify(entry.name)
        return True

    def mark_unavailable(self, exc: AgentError) -> None:
        """The store is down as a whole (e.g. it cannot even list): every entry is stale."""
        for entry in self._entries.values():
            self._failing(entry, exc)

    def remove(self, name: str) -> None:
        """Forget ``name`` (it is loaded again on the next read)."""
        entry = self._entries.pop(name, None)
        self._removals += 1
        self._removed[name] = self._removals
        self.metrics.cache_secrets.set(len(self._entries))
        if entry is not None and entry.failing_since is not None:
            self._stale_changed(-1)

    def _stale_changed(self, delta: int) -> None:
        # Counted as entries turn stale or fresh: a recount over every entry per
        # confirmed secret made a resync quadratic in the number of secrets.
        self._stale += delta
        self.metrics.cache_stale_secrets.set(self._stale)

    def stale_age(self) -> float:
        """Seconds the longest-failing secret has been served stale (0: none is)."""
        if not self._stale:
            return 0.0
        since = [e.failing_since for e in self._entries.values() if e.failing_since is not None]
        return max(0.0, self.clock() - min(since)) if since else 0.0

    def _notify(self, name: str) -> None:
        for listener in list(self._listeners):
            try:
                listener(name)
            except Exception:
                log.exception("change listener failed for secret %r", name)

    async def aclose(self) -> None:
        """Cancel in-flight work and drop every value."""
        await self._flights.aclose()
        self._entries.clear()
