"""The shipped alert rules in a real Prometheus: a store outage fires SecretsAgentSecretStale."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.agentenv import AgentEnv
from tests.servers import EtcdServer, free_port

pytestmark = pytest.mark.integration

ALERTS = Path(__file__).resolve().parent.parent / "examples" / "prometheus" / "alerts.yml"
STALE = 'ALERTS{alertname="SecretsAgentSecretStale", alertstate="firing"}'


def _rules_with_a_short_stale_threshold(tmp_path: Path) -> Path:
    """examples/prometheus/alerts.yml as shipped, but stale after 2s rather than 120s."""
    text, n = re.subn(
        r"(secrets_agent_cache_stale_age_seconds) > 120", r"\1 > 2", ALERTS.read_text()
    )
    assert n == 1, "the stale rule's expression changed; update this test"
    path = tmp_path / "alerts.yml"
    path.write_text(text)
    return path


async def _until(what: str, check: Callable[[], Any], timeout: float = 60) -> Any:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        result = await asyncio.to_thread(check)
        if result:
            return result
        await asyncio.sleep(0.5)
    raise AssertionError(f"{what} did not happen within {timeout:.0f}s")


async def test_a_store_outage_fires_the_stale_secret_alert_and_recovery_clears_it(
    env: AgentEnv,
    etcd_server: EtcdServer,
    prometheus_server: Callable[..., Any],
    tmp_path: Path,
) -> None:
    port = free_port()
    env.configure(
        store={
            "type": "etcd",
            "endpoints": [etcd_server.endpoint],
            "prefix": f"/alerts-{port}",
            "timeout": "1s",
        },
        refresh={"interval": "1s", "backoff_initial": "200ms", "backoff_max": "1s"},
        metrics={"listen": f"127.0.0.1:{port}"},
    )
    env.put("app/db", "before-the-outage")
    rules = _rules_with_a_short_stale_threshold(tmp_path)
    async with env.running() as agent:
        prometheus = await asyncio.to_thread(
            prometheus_server,
            [f"127.0.0.1:{port}"],
            rule_files=[rules],
            job="secrets-agent",
        )
        await asyncio.to_thread(prometheus.wait_for_target_up, 30)
        await _until("a scrape of the agent", lambda: prometheus.query("secrets_agent_ready == 1"))
        assert await asyncio.to_thread(prometheus.query, STALE) == []

        await asyncio.to_thread(etcd_server.stop)
        try:
            firing = await _until("the stale alert", lambda: prometheus.query(STALE))
            assert firing[0]["metric"]["severity"] == "warning"
            assert firing[0]["metric"]["job"] == "secrets-agent"
            # the app is still served the last good value meanwhile
            assert await agent.value("app/db") == b"before-the-outage"
        finally:
            await asyncio.to_thread(etcd_server.start)
        await _until("the alert to clear", lambda: not prometheus.query(STALE))
        age = await asyncio.to_thread(prometheus.query, "secrets_agent_cache_stale_age_seconds")
        assert float(age[0]["value"][1]) == 0
