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

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, TypeVar

from agent.config import RefreshConfig
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
from agent.stores.base import BatchReadableStore, StageState, StoredVersion
from agent.types import CURRENT, Secret, normalize_stage, stages_of, validate_name

if TYPE_CHECKING:
    from agent.audit import Auditor
    from agent.stageguard import StageGuard

log = logging.getLogger(__name__)
T = TypeVar("T")
_EXTRA_VERSIONS = 8  # versions asked for by id that carry no stage, per secret


@dataclass(frozen=True, slots=True)
class Lookup:
    """A cache answer: the secret, whether it is stale, and its age in seconds."""

    secret: Secret
    stale: bool = False
    age: float = 0.0


_CURRENT_ONLY = frozenset({CURRENT})


@dataclass(slots=True)
class _Entry:
    """One cached secret. Kept small (there may be 50,000): rarely used parts are
    None or shared until first needed, times are floats (formatted on demand)."""

    name: str
    state: StageState
    versions: dict[str, Secret]
    confirmed_at: float  # monotonic time of the last successful version check
    wanted: frozenset[str] = _CURRENT_ONLY
    extra: OrderedDict[str, Secret] | None = None
    failing_since: float | None = None
    last_error: str | None = None
    last_refresh: float | None = None  # wall-clock time of the last successful check
    missing_since: float | None = None
    refused: dict[str, str] | None = None  # version id -> envelope digest
    last_forced: float = float("-inf")


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
        self._inflight: dict[tuple[str, ...], asyncio.Task[Any]] = {}
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
            entry = await self._single_flight(("load", name), lambda: self._load(name))
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
        out = []
        for name in sorted(self._entries):
            e = self._entries[name]
            out.append(
                {
                    "name": name,
                    "version_id": e.state.stages.get(CURRENT),
                    "stages": dict(e.state.stages),
                    "age_seconds": round(now - e.confirmed_at, 3),
                    "last_refresh": _iso(e.last_refresh),
                    "stale": e.failing_since is not None,
                    "last_error": e.last_error,
                }
            )
        return out

    def _check_keys(self, secret: Secret) -> None:
        """Stop serving a value once every master key it hangs on has been revoked
        for longer than ``datakeys.max_age`` (as long as its data key could stay cached).

        Raises:
            KeyRevoked: naming the secret and the keys, never the value.
        """
        keys = self.resolver.datakeys
        if not keys.any_revoked:
            return
        mine = [(p, k) for p, k in secret.recipients if keys.configured(p)]
        if not mine:
            return
        ages = [keys.revoked_for(p, k) for p, k in mine]
        if any(age is None or age < keys.max_age for age in ages):
            return
        self.metrics.cache_requests.labels("revoked").inc()
        names = ", ".join(f"{p}/{k}" for p, k in mine)
        raise KeyRevoked(
            f"secret {secret.name!r} is no longer served: its master key(s) {names} were "
            f"disabled, deleted or denied more than datakeys.max_age "
            f"({keys.max_age:.0f}s) ago",
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
            secret = await self._single_flight(
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
        secret = await self._single_flight(
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
            changed: bool = await self._single_flight(
                ("refresh", name), lambda: self._refresh(name)
            )
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
            await self._single_flight(("load", name), lambda: self._load(name))
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
        entry.state = state
        entry.versions = versions
        if entry.extra:
            entry.extra = OrderedDict(
                (v, s.with_stages(stages_of(state.stages, v))) for v, s in entry.extra.items()
            )
        if not entry.refused:
            entry.refused = None
        self._confirmed(entry)

    # ---------------------------------------------------------- batched refresh

    async def refresh_batch(self, names: Sequence[str], *, trigger: str) -> list[str]:
        """Refresh ``names`` with two store calls (stage maps, then envelopes).

        For a :class:`~agent.stores.base.BatchReadableStore`. Every name the
        batch cannot settle plainly (an error of any kind, a refused or
        vanished version) is returned, for :meth:`refresh` to do one by one
        with its exact error semantics; so is nothing else. A name that
        another refresh changed while the batch was reading is left alone.

        Returns:
            The names left for :meth:`refresh`.
        """
        store = self.resolver.store
        assert isinstance(store, BatchReadableStore)
        seen = [self._entries.get(n) for n in names]
        removed = [self._removed.get(n) for n in names]
        seen_states = [e.state if e is not None else None for e in seen]
        states = await store.read_stages_many(names)
        left: list[str] = []
        todo: list[tuple[int, StageState, list[str]]] = []
        # name index -> the version keying its map's proof (read with the others)
        proof_keys: dict[int, str] = {}
        guard = self.resolver.guard if self.resolver.guard and self.resolver.guard.active else None
        unchanged = 0
        for i, (name, state) in enumerate(zip(names, states, strict=True)):
            entry = seen[i]
            if not isinstance(state, StageState):
                left.append(name)
            elif entry is not None and state.revision == entry.state.revision:
                if entry.state is seen_states[i]:
                    entry.state = state  # the same map, with the marker it has now
                entry.missing_since = None
                self._confirmed(entry)
                unchanged += 1
            else:
                if guard is not None and state.revision != "":
                    key_version = guard.proof_key_version(state)
                    if key_version is None:
                        left.append(name)  # no readable proof: refused one by one
                        continue
                    proof_keys[i] = key_version
                wanted = entry.wanted if entry is not None else _CURRENT_ONLY
                held = entry.versions if entry is not None else {}
                vids = sorted(
                    {v for st, v in state.stages.items() if st in wanted and v not in held}
                )
                todo.append((i, state, vids))
        if unchanged:
            self.metrics.version_checks.labels("unchanged").inc(unchanged)
            self.metrics.refreshes.labels(trigger, "unchanged").inc(unchanged)
        wanted_versions = list(
            dict.fromkeys(
                [(names[i], v) for i, _, vids in todo for v in vids]
                + [(names[i], v) for i, v in proof_keys.items()]
            )
        )
        stored = await store.read_versions_many(wanted_versions) if wanted_versions else []
        envelopes = dict(zip(wanted_versions, stored, strict=True))
        changed = loaded = 0
        for n, (i, state, vids) in enumerate(todo):
            if n % 32 == 31:
                await asyncio.sleep(0)  # let readers in between decrypts
            name = names[i]
            if i in proof_keys:
                assert guard is not None
                checked = await self._proven(
                    guard, name, state, envelopes.get((name, proof_keys[i]))
                )
                if checked is None:
                    left.append(name)  # unsure, or refused with nothing in service
                    continue
                if checked is not state:
                    # Refused: the guard hands back the map in service, as
                    # Resolver.stages does for refresh(): nothing changes.
                    in_service = seen[i]
                    if in_service is not None:
                        self._confirmed(in_service)
                    continue
            opened = await self._open_batch(name, state, vids, envelopes)
            entry = self._entries.get(name)
            if opened is None:
                left.append(name)
            elif entry is not seen[i] or (entry is not None and entry.state is not seen_states[i]):
                continue  # another refresh got there first; it read the map later
            elif self._removed.get(name) != removed[i]:
                continue  # removed meanwhile (a reload dropped it): hold nothing
            else:
                self._apply_batch(name, entry, state, opened)
                if entry is None:
                    loaded += 1
                else:
                    changed += 1
        if changed:
            self.metrics.version_checks.labels("changed").inc(changed)
            self.metrics.refreshes.labels(trigger, "changed").inc(changed)
        if loaded:
            # A first load is not a change (as in refresh()).
            self.metrics.refreshes.labels(trigger, "loaded").inc(loaded)
        self.metrics.cache_secrets.set(len(self._entries))
        return left

    @staticmethod
    async def _proven(
        guard: StageGuard, name: str, state: StageState, key: StoredVersion | Exception | None
    ) -> StageState | None:
        """The guard's answer for ``state`` (its proof's key envelope pre-read).

        None when the batch cannot decide: the key envelope is missing or the
        guard raised (refresh() then reads again and reports).
        """
        if not isinstance(key, StoredVersion):
            return None
        try:
            return await guard.check(name, state, key_envelope=key)
        except AgentError:
            return None

    async def _open_batch(
        self,
        name: str,
        state: StageState,
        vids: list[str],
        envelopes: dict[tuple[str, str], StoredVersion | Exception],
    ) -> dict[str, Secret] | None:
        """The versions ``vids`` of ``name`` decrypted, or None to leave it to :meth:`refresh`."""
        entry = self._entries.get(name)
        out: dict[str, Secret] = {}
        for vid in vids:
            got = envelopes.get((name, vid))
            if not isinstance(got, StoredVersion):
                return None
            if entry is not None and entry.refused and vid in entry.refused:
                return None
            try:
                out[vid] = await self.resolver.open(
                    name, vid, got.envelope, got.created_at, stages_of(state.stages, vid)
                )
            except AgentError:
                return None  # refresh() reads it again and reports (and audits) it
        if out:
            self.metrics.fetches.labels("ok").inc(len(out))
        return out

    def _apply_batch(
        self, name: str, entry: _Entry | None, state: StageState, opened: dict[str, Secret]
    ) -> None:
        if entry is None:
            entry = _Entry(name, state, opened, self.clock(), last_refresh=time.time())
            self._entries[name] = entry
        else:
            entry.missing_since = None
            versions = {
                vid: secret.with_stages(stages_of(state.stages, vid))
                for vid, secret in entry.versions.items()
                if vid in state.stages.values()
            }
            versions.update(opened)
            self._install(entry, state, versions)
        self._notify(name)

    async def changed_markers(self, names: Sequence[str]) -> list[str]:
        """Of ``names``, those whose stage map may have changed, by the store's cheap markers.

        The others are confirmed fresh without reading anything (counted as
        unchanged version checks). Names not held, or without a marker, are
        returned too. For a :class:`~agent.stores.base.BatchReadableStore`.
        """
        store = self.resolver.store
        assert isinstance(store, BatchReadableStore)
        markers = await store.stage_markers_many(names)
        changed: list[str] = []
        unchanged = 0
        for name, marker in zip(names, markers, strict=True):
            entry = self._entries.get(name)
            if (
                entry is None
                or marker is None
                or marker != entry.state.marker
                or entry.missing_since is not None
            ):
                changed.append(name)
            else:
                self._confirmed(entry)
                unchanged += 1
        if unchanged:
            self.metrics.version_checks.labels("unchanged").inc(unchanged)
        return changed

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
        versions that still carry a stage, so the old CURRENT, now PREVIOUS,
        costs nothing.
        """
        versions: dict[str, Secret] = {}
        staged = set(state.stages.values())
        for vid, secret in held.items():
            if vid in staged:
                versions[vid] = secret.with_stages(stages_of(state.stages, vid))
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

    # ----------------------------------------------------------- single-flight

    async def _single_flight(self, key: tuple[str, ...], factory: Callable[[], Awaitable[T]]) -> T:
        task = self._inflight.get(key)
        if task is None:
            task = asyncio.ensure_future(factory())
            self._inflight[key] = task
            task.add_done_callback(lambda t: self._done(key, t))
        # shield: a cancelled reader must not cancel the shared work of others.
        result: T = await asyncio.shield(task)
        return result

    def _done(self, key: tuple[str, ...], task: asyncio.Task[Any]) -> None:
        self._inflight.pop(key, None)
        if not task.cancelled():
            task.exception()  # retrieved here in case every waiter was cancelled

    async def aclose(self) -> None:
        """Cancel in-flight work and drop every value."""
        tasks = list(self._inflight.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._entries.clear()


def _iso(wall: float | None) -> str | None:
    return None if wall is None else datetime.fromtimestamp(wall, UTC).isoformat()
