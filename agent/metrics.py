"""Every Prometheus metric the agent exports, defined once.

Metrics live on an injectable :class:`~prometheus_client.CollectorRegistry` so
tests get a fresh set each. Names follow ``secrets_agent_<noun>_<unit>``; label
values come from small fixed sets (outcomes, provider names from the config,
route templates), never from secret names, values or callers.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar, overload

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    ProcessCollector,
)

import agent

#: Refresh triggers, the ``trigger`` label of ``secrets_agent_refreshes_total``.
REFRESH_TRIGGERS = ("startup", "poll", "watch", "request")
#: Rotation steps, the ``step`` label of ``secrets_agent_rotation_steps_total``.
ROTATION_STEPS = ("create", "set", "test", "finish")

M = TypeVar("M", Counter, Gauge, Histogram)

_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)


class _Def(Generic[M]):
    """One metric of :class:`Metrics`, declared once in its class body.

    ``Metrics.__init__`` creates it on the instance's registry under the same
    attribute name; the instance attribute then hides this descriptor, so
    reading a metric costs no call.
    """

    def __init__(self, create: Callable[[CollectorRegistry], M]) -> None:
        self.create: Callable[[CollectorRegistry], M] = create
        self.attr = ""

    def __set_name__(self, owner: type, attr: str) -> None:
        self.attr = attr

    @overload
    def __get__(self, obj: None, owner: type) -> _Def[M]: ...
    @overload
    def __get__(self, obj: object, owner: type) -> M: ...
    def __get__(self, obj: object, owner: type) -> _Def[M] | M:
        if obj is None:
            return self
        raise AttributeError(f"metric {self.attr} is created in Metrics.__init__")


def _counter(name: str, doc: str, labels: tuple[str, ...] = ()) -> _Def[Counter]:
    return _Def(lambda r: Counter(name, doc, labels, registry=r))


def _gauge(name: str, doc: str, labels: tuple[str, ...] = ()) -> _Def[Gauge]:
    return _Def(lambda r: Gauge(name, doc, labels, registry=r))


def _histogram(name: str, doc: str, labels: tuple[str, ...] = ()) -> _Def[Histogram]:
    """A latency histogram (buckets from 0.5 ms to 5 s)."""
    return _Def(lambda r: Histogram(name, doc, labels, buckets=_LATENCY_BUCKETS, registry=r))


class Metrics:
    """The agent's metrics on one registry."""

    # Cache (cache.py)
    cache_requests = _counter(
        "secrets_agent_cache_requests_total",
        "Reads answered by the secret cache, by result (hit, miss, stale, error).",
        ("result",),
    )
    cache_secrets = _gauge("secrets_agent_cache_secrets", "Secrets held in the cache.")
    cache_stale_secrets = _gauge(
        "secrets_agent_cache_stale_secrets",
        "Secrets currently served from stale data because the store is failing.",
    )
    cache_stale_age = _gauge(
        "secrets_agent_cache_stale_age_seconds",
        "How long the longest-failing secret has been served stale (0: none is stale).",
    )
    secrets_removed = _counter(
        "secrets_agent_secrets_removed_total",
        "Secrets dropped from the cache after they were deleted from the store.",
    )

    # Resolver: full fetch + decrypt of one version (resolver.py)
    fetches = _counter(
        "secrets_agent_secret_fetches_total",
        "Full fetches of a secret version from the store, by outcome.",
        ("outcome",),
    )
    decrypts = _counter(
        "secrets_agent_decrypts_total",
        "Envelope decryptions, by outcome (ok, refused).",
        ("outcome",),
    )
    stage_maps_refused = _counter(
        "secrets_agent_stage_maps_refused_total",
        "Stage maps refused (no or bad proof, replayed older map), by reason; "
        "the version in service stays.",
        ("reason",),
    )
    stage_maps_held_back = _gauge(
        "secrets_agent_stage_maps_held_back",
        "Secrets whose newest stage map is refused (the version in service stays).",
    )
    envelopes_refused = _counter(
        "secrets_agent_envelopes_refused_total",
        "Envelopes refused (malformed, misplaced, tampered, undecryptable), by reason.",
        ("reason",),
    )

    # Data keys (crypto/datakeys.py)
    datakey_cache = _counter(
        "secrets_agent_datakey_cache_events_total",
        "Data-key cache events: hit, miss, evicted, expired, exhausted, dropped.",
        ("event",),
    )
    datakey_cache_size = _gauge(
        "secrets_agent_datakey_cache_entries", "Unwrapped data keys held in memory."
    )
    datakeys_generated = _counter(
        "secrets_agent_datakeys_generated_total", "New data keys generated for writing."
    )

    # Key providers (keys/*)
    key_operations = _counter(
        "secrets_agent_key_operations_total",
        "Calls to key providers (wrap, unwrap), by provider and outcome.",
        ("provider", "operation", "outcome"),
    )
    key_operation_seconds = _histogram(
        "secrets_agent_key_operation_seconds",
        "Latency of key-provider calls.",
        ("provider", "operation"),
    )
    keys_revoked = _gauge(
        "secrets_agent_keys_revoked",
        "Master keys seen disabled, deleted or missing by the key-state check.",
    )
    key_rotations = _counter(
        "secrets_agent_key_rotations_total",
        "Scheduled master-key rotations (keys.<name>.rotate_every), by provider and outcome.",
        ("provider", "outcome"),
    )
    key_rotation_next = _gauge(
        "secrets_agent_key_rotation_next_timestamp_seconds",
        "When each scheduled provider's master key is next due for rotation.",
        ("provider",),
    )
    key_unwrap_answered = _counter(
        "secrets_agent_key_unwrap_provider_total",
        "Which provider answered an unwrap when an envelope has several recipients.",
        ("provider",),
    )

    # Store (stores/*, refresh.py)
    store_operations = _counter(
        "secrets_agent_store_operations_total",
        "Store calls, by operation and outcome (ok, not_found, unavailable, error).",
        ("operation", "outcome"),
    )
    version_checks = _counter(
        "secrets_agent_version_checks_total",
        "Cheap version checks, by outcome (unchanged, changed, error).",
        ("outcome",),
    )
    refreshes = _counter(
        "secrets_agent_refreshes_total",
        "Refresh attempts, by trigger (startup, poll, watch, request) and outcome "
        "(loaded: first load, changed, unchanged, error).",
        ("trigger", "outcome"),
    )
    refresh_seconds = _histogram(
        "secrets_agent_refresh_seconds", "Duration of one refresh attempt."
    )
    watch_events = _counter(
        "secrets_agent_watch_events_total",
        "Change notifications pushed by the store (event) and watch restarts (restart).",
        ("kind",),
    )

    # HTTP (server/*)
    http_requests = _counter(
        "secrets_agent_http_requests_total",
        "HTTP requests, by listener, route and status.",
        ("listener", "route", "status"),
    )
    http_request_seconds = _histogram(
        "secrets_agent_http_request_seconds", "HTTP request latency.", ("listener", "route")
    )
    access_decisions = _counter(
        "secrets_agent_access_decisions_total",
        "Access decisions on reads, by listener and decision (allow, deny).",
        ("listener", "decision"),
    )

    # Rendering (render/*)
    renders = _counter(
        "secrets_agent_renders_total",
        "Template renders, by template (its name, or its index in the config) "
        "and outcome (written, unchanged, error).",
        ("template", "outcome"),
    )
    notifications = _counter(
        "secrets_agent_notifications_total",
        "App notifications after a render, by kind (signal, command) and outcome.",
        ("kind", "outcome"),
    )

    # Rotation (rotation/*)
    # ``secret`` is the secret named by a rotation rule in the config (a
    # bounded set), or "(adhoc)" for a CLI rotation outside any rule.
    rotations = _counter(
        "secrets_agent_rotation_steps_total",
        "Rotation steps (create, set, test, finish), by rule secret, step and outcome "
        "(ok, failed, unavailable).",
        ("secret", "step", "outcome"),
    )
    rotations_done = _counter(
        "secrets_agent_rotations_total",
        "Rotation attempts, by rule secret and outcome (rotated, failed, unavailable).",
        ("secret", "outcome"),
    )
    rotation_last_success = _gauge(
        "secrets_agent_rotation_last_success_timestamp_seconds",
        "When the last rotation of a rule's secret completed (Unix time).",
        ("secret",),
    )
    rotation_next = _gauge(
        "secrets_agent_rotation_next_timestamp_seconds",
        "When a rule's next scheduled rotation is due (Unix time).",
        ("secret",),
    )
    rotation_failures_in_a_row = _gauge(
        "secrets_agent_rotation_failures_in_a_row",
        "Failed rotation attempts of a rule's secret since its last success.",
        ("secret",),
    )

    # Audit and lifecycle
    audit_events = _counter(
        "secrets_agent_audit_events_total", "Audit records written, by event.", ("event",)
    )
    config_reloads = _counter(
        "secrets_agent_config_reloads_total", "Config reloads, by outcome.", ("outcome",)
    )
    part_restarts = _counter(
        "secrets_agent_part_restarts_total",
        "Restarts of a supervised daemon part after an unexpected error, by part.",
        ("part",),
    )
    ready = _gauge("secrets_agent_ready", "1 once every configured secret has loaded.")

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self._children: dict[tuple[object, tuple[str, ...]], object] = {}
        r = self.registry
        self.info = Info("secrets_agent_build", "Agent version.", registry=r)
        self.info.info({"version": agent.__version__})
        # process_cpu_seconds_total, process_resident_memory_bytes, open fds... (Linux only).
        ProcessCollector(registry=r)
        # In declaration order, which is the order of /metrics.
        for definition in vars(Metrics).values():
            if isinstance(definition, _Def):
                setattr(self, definition.attr, definition.create(r))
        self._zero_error_series()

    def _zero_error_series(self) -> None:
        """Create the error series at 0, so ``increase()`` and ``rate()`` see the first error.

        A counter series that first appears at 1 has no earlier sample, and
        Prometheus' ``increase()`` over it reads 0: the first failure would
        never alert. Series labelled by config values (providers, templates)
        are created where those are known.
        """
        for reason in ("unproven", "mismatch", "replayed", "invalid"):
            self.stage_maps_refused.labels(reason)
        self.cache_requests.labels("error")
        self.fetches.labels("unavailable")
        self.fetches.labels("not_found")
        self.decrypts.labels("refused")
        self.version_checks.labels("error")
        for trigger in REFRESH_TRIGGERS:
            self.refreshes.labels(trigger, "error")
        for kind in ("signal", "command"):
            self.notifications.labels(kind, "error")
        self.config_reloads.labels("rejected")

    def zero_rotation_errors(self, secrets: list[str]) -> None:
        """Create the failure series of each rotation rule's secret at 0."""
        for secret in secrets:
            self.rotations_done.labels(secret, "failed")
            for step in ROTATION_STEPS:
                self.rotations.labels(secret, step, "failed")

    def zero_template_errors(self, templates: list[str]) -> None:
        """Create ``secrets_agent_renders_total{template, outcome="error"}`` at 0."""
        for name in templates:
            self.renders.labels(name, "error")

    def child(self, metric: M, *labels: str) -> M:
        """``metric.labels(*labels)``, bound once and reused (for per-request paths).

        ``labels()`` validates and locks on every call; the label sets are
        small and fixed, so the children are kept here.
        """
        key = (metric, labels)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = metric.labels(*labels)
        return found  # type: ignore[return-value]
