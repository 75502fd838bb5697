"""Every Prometheus metric the agent exports, defined once.

Metrics live on an injectable :class:`~prometheus_client.CollectorRegistry` so
tests get a fresh set each. Names follow ``secrets_agent_<noun>_<unit>``; label
values come from small fixed sets (outcomes, provider names from the config,
route templates), never from secret names, values or callers.
"""

from __future__ import annotations

from typing import TypeVar

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


class Metrics:
    """The agent's metrics on one registry."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self._children: dict[tuple[object, tuple[str, ...]], object] = {}
        r = self.registry
        self.info = Info("secrets_agent_build", "Agent version.", registry=r)
        self.info.info({"version": agent.__version__})
        # process_cpu_seconds_total, process_resident_memory_bytes, open fds... (Linux only).
        ProcessCollector(registry=r)

        # Cache (cache.py)
        self.cache_requests = Counter(
            "secrets_agent_cache_requests_total",
            "Reads answered by the secret cache, by result (hit, miss, stale, error).",
            ["result"],
            registry=r,
        )
        self.cache_secrets = Gauge(
            "secrets_agent_cache_secrets", "Secrets held in the cache.", registry=r
        )
        self.cache_stale_secrets = Gauge(
            "secrets_agent_cache_stale_secrets",
            "Secrets currently served from stale data because the store is failing.",
            registry=r,
        )
        self.cache_stale_age = Gauge(
            "secrets_agent_cache_stale_age_seconds",
            "How long the longest-failing secret has been served stale (0: none is stale).",
            registry=r,
        )
        self.secrets_removed = Counter(
            "secrets_agent_secrets_removed_total",
            "Secrets dropped from the cache after they were deleted from the store.",
            registry=r,
        )

        # Resolver: full fetch + decrypt of one version (resolver.py)
        self.fetches = Counter(
            "secrets_agent_secret_fetches_total",
            "Full fetches of a secret version from the store, by outcome.",
            ["outcome"],
            registry=r,
        )
        self.decrypts = Counter(
            "secrets_agent_decrypts_total",
            "Envelope decryptions, by outcome (ok, refused).",
            ["outcome"],
            registry=r,
        )
        self.stage_maps_refused = Counter(
            "secrets_agent_stage_maps_refused_total",
            "Stage maps refused (no or bad proof, replayed older map), by reason; "
            "the version in service stays.",
            ["reason"],
            registry=r,
        )
        for reason in ("unproven", "mismatch", "replayed", "invalid"):
            self.stage_maps_refused.labels(reason)
        self.stage_maps_held_back = Gauge(
            "secrets_agent_stage_maps_held_back",
            "Secrets whose newest stage map is refused (the version in service stays).",
            registry=r,
        )
        self.envelopes_refused = Counter(
            "secrets_agent_envelopes_refused_total",
            "Envelopes refused (malformed, misplaced, tampered, undecryptable), by reason.",
            ["reason"],
            registry=r,
        )

        # Data keys (crypto/datakeys.py)
        self.datakey_cache = Counter(
            "secrets_agent_datakey_cache_events_total",
            "Data-key cache events: hit, miss, evicted, expired, exhausted, dropped.",
            ["event"],
            registry=r,
        )
        self.datakey_cache_size = Gauge(
            "secrets_agent_datakey_cache_entries", "Unwrapped data keys held in memory.", registry=r
        )
        self.datakeys_generated = Counter(
            "secrets_agent_datakeys_generated_total",
            "New data keys generated for writing.",
            registry=r,
        )

        # Key providers (keys/*)
        self.key_operations = Counter(
            "secrets_agent_key_operations_total",
            "Calls to key providers (wrap, unwrap), by provider and outcome.",
            ["provider", "operation", "outcome"],
            registry=r,
        )
        self.key_operation_seconds = Histogram(
            "secrets_agent_key_operation_seconds",
            "Latency of key-provider calls.",
            ["provider", "operation"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.keys_revoked = Gauge(
            "secrets_agent_keys_revoked",
            "Master keys seen disabled, deleted or missing by the key-state check.",
            registry=r,
        )
        self.key_rotations = Counter(
            "secrets_agent_key_rotations_total",
            "Scheduled master-key rotations (keys.<name>.rotate_every), by provider and outcome.",
            ["provider", "outcome"],
            registry=r,
        )
        self.key_rotation_next = Gauge(
            "secrets_agent_key_rotation_next_timestamp_seconds",
            "When each scheduled provider's master key is next due for rotation.",
            ["provider"],
            registry=r,
        )
        self.key_unwrap_answered = Counter(
            "secrets_agent_key_unwrap_provider_total",
            "Which provider answered an unwrap when an envelope has several recipients.",
            ["provider"],
            registry=r,
        )

        # Store (stores/*, refresh.py)
        self.store_operations = Counter(
            "secrets_agent_store_operations_total",
            "Store calls, by operation and outcome (ok, not_found, unavailable, error).",
            ["operation", "outcome"],
            registry=r,
        )
        self.version_checks = Counter(
            "secrets_agent_version_checks_total",
            "Cheap version checks, by outcome (unchanged, changed, error).",
            ["outcome"],
            registry=r,
        )
        self.refreshes = Counter(
            "secrets_agent_refreshes_total",
            "Refresh attempts, by trigger (startup, poll, watch, request) and outcome "
            "(loaded: first load, changed, unchanged, error).",
            ["trigger", "outcome"],
            registry=r,
        )
        self.refresh_seconds = Histogram(
            "secrets_agent_refresh_seconds",
            "Duration of one refresh attempt.",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.watch_events = Counter(
            "secrets_agent_watch_events_total",
            "Change notifications pushed by the store (event) and watch restarts (restart).",
            ["kind"],
            registry=r,
        )

        # HTTP (server/*)
        self.http_requests = Counter(
            "secrets_agent_http_requests_total",
            "HTTP requests, by listener, route and status.",
            ["listener", "route", "status"],
            registry=r,
        )
        self.http_request_seconds = Histogram(
            "secrets_agent_http_request_seconds",
            "HTTP request latency.",
            ["listener", "route"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.access_decisions = Counter(
            "secrets_agent_access_decisions_total",
            "Access decisions on reads, by listener and decision (allow, deny).",
            ["listener", "decision"],
            registry=r,
        )

        # Rendering (render/*)
        self.renders = Counter(
            "secrets_agent_renders_total",
            "Template renders, by template (its name, or its index in the config) "
            "and outcome (written, unchanged, error).",
            ["template", "outcome"],
            registry=r,
        )
        self.notifications = Counter(
            "secrets_agent_notifications_total",
            "App notifications after a render, by kind (signal, command) and outcome.",
            ["kind", "outcome"],
            registry=r,
        )

        # Rotation (rotation/*)
        # ``secret`` is the secret named by a rotation rule in the config (a
        # bounded set), or "(adhoc)" for a CLI rotation outside any rule.
        self.rotations = Counter(
            "secrets_agent_rotation_steps_total",
            "Rotation steps (create, set, test, finish), by rule secret, step and outcome "
            "(ok, failed, unavailable).",
            ["secret", "step", "outcome"],
            registry=r,
        )
        self.rotations_done = Counter(
            "secrets_agent_rotations_total",
            "Rotation attempts, by rule secret and outcome (rotated, failed, unavailable).",
            ["secret", "outcome"],
            registry=r,
        )
        self.rotation_last_success = Gauge(
            "secrets_agent_rotation_last_success_timestamp_seconds",
            "When the last rotation of a rule's secret completed (Unix time).",
            ["secret"],
            registry=r,
        )
        self.rotation_next = Gauge(
            "secrets_agent_rotation_next_timestamp_seconds",
            "When a rule's next scheduled rotation is due (Unix time).",
            ["secret"],
            registry=r,
        )
        self.rotation_failures_in_a_row = Gauge(
            "secrets_agent_rotation_failures_in_a_row",
            "Failed rotation attempts of a rule's secret since its last success.",
            ["secret"],
            registry=r,
        )

        # Audit and lifecycle
        self.audit_events = Counter(
            "secrets_agent_audit_events_total",
            "Audit records written, by event.",
            ["event"],
            registry=r,
        )
        self.config_reloads = Counter(
            "secrets_agent_config_reloads_total",
            "Config reloads, by outcome.",
            ["outcome"],
            registry=r,
        )
        self.part_restarts = Counter(
            "secrets_agent_part_restarts_total",
            "Restarts of a supervised daemon part after an unexpected error, by part.",
            ["part"],
            registry=r,
        )
        self.ready = Gauge(
            "secrets_agent_ready", "1 once every configured secret has loaded.", registry=r
        )
        self._zero_error_series()

    def _zero_error_series(self) -> None:
        """Create the error series at 0, so ``increase()`` and ``rate()`` see the first error.

        A counter series that first appears at 1 has no earlier sample, and
        Prometheus' ``increase()`` over it reads 0: the first failure would
        never alert. Series labelled by config values (providers, templates)
        are created where those are known.
        """
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
