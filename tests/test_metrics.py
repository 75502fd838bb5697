"""Metrics completeness: error series at zero, staleness age, process metrics, no
"changed" refreshes at startup, a bounded template label on renders."""

from __future__ import annotations

import pytest
from prometheus_client import generate_latest

from agent.errors import BackendUnavailable
from agent.metrics import REFRESH_TRIGGERS, ROTATION_STEPS, Metrics
from tests.test_refresh import World


def _value(m: Metrics, name: str, **labels: str) -> float | None:
    return m.registry.get_sample_value(name, labels)


def test_error_series_exist_at_zero_before_any_error() -> None:
    """increase() over a series born at 1 reads 0: the first error must find a 0 sample."""
    m = Metrics()
    for trigger in REFRESH_TRIGGERS:
        assert _value(m, "secrets_agent_refreshes_total", trigger=trigger, outcome="error") == 0
    m.zero_rotation_errors(["prod/db"])
    for step in ROTATION_STEPS:
        labels = {"secret": "prod/db", "step": step, "outcome": "failed"}
        assert _value(m, "secrets_agent_rotation_steps_total", **labels) == 0
    assert _value(m, "secrets_agent_rotations_total", secret="prod/db", outcome="failed") == 0
    assert _value(m, "secrets_agent_cache_requests_total", result="error") == 0
    assert _value(m, "secrets_agent_secret_fetches_total", outcome="unavailable") == 0
    assert _value(m, "secrets_agent_decrypts_total", outcome="refused") == 0
    assert _value(m, "secrets_agent_version_checks_total", outcome="error") == 0
    assert _value(m, "secrets_agent_config_reloads_total", outcome="rejected") == 0
    m.zero_template_errors(["db", "1"])
    assert _value(m, "secrets_agent_renders_total", template="db", outcome="error") == 0
    assert _value(m, "secrets_agent_renders_total", template="1", outcome="error") == 0


def test_process_metrics_are_exported() -> None:
    text = generate_latest(Metrics().registry).decode()
    assert "process_resident_memory_bytes" in text
    assert "process_open_fds" in text


async def test_startup_loads_are_counted_as_loaded_not_changed() -> None:
    w = World()
    await w.writer.put("a", b"1")
    await w.writer.put("b", b"1")
    await w.refresher.load_all()
    assert w.sample("secrets_agent_refreshes_total", trigger="startup", outcome="loaded") == 2
    assert w.sample("secrets_agent_refreshes_total", trigger="startup", outcome="changed") == 0
    await w.writer.put("a", b"2")
    assert await w.cache.refresh("a", trigger="watch")
    assert w.sample("secrets_agent_refreshes_total", trigger="watch", outcome="changed") == 1


async def test_stale_age_grows_during_an_outage_and_returns_to_zero() -> None:
    w = World(max_stale=3600)
    await w.writer.put("db", b"good")
    await w.writer.put("api", b"good")
    await w.refresher.load_all()
    assert w.sample("secrets_agent_cache_stale_age_seconds") == 0
    w.store.unavailable = True
    with pytest.raises(BackendUnavailable):
        await w.cache.refresh("db")
    w.clock.now += 40
    with pytest.raises(BackendUnavailable):
        await w.cache.refresh("api")
    w.clock.now += 20
    # the longest-failing secret counts: db, failing for 60s
    assert w.sample("secrets_agent_cache_stale_age_seconds") == pytest.approx(60)
    w.store.unavailable = False
    await w.cache.refresh("db")
    assert w.sample("secrets_agent_cache_stale_age_seconds") == pytest.approx(20)
    await w.cache.refresh("api")
    assert w.sample("secrets_agent_cache_stale_age_seconds") == 0
