"""A real Prometheus scrapes the agent's metrics listener."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable, Sequence
from typing import Any

import pytest

from tests.agentenv import AgentEnv

pytestmark = pytest.mark.integration


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_prometheus_scrapes_cache_key_and_refresh_metrics(
    env: AgentEnv, prometheus_server: Callable[[Sequence[str]], Any]
) -> None:
    port = _free_port()
    env.configure(metrics={"listen": f"127.0.0.1:{port}"})
    env.put("db", "PROM-SECRET-VALUE")
    async with env.running() as agent:
        assert await agent.value("db") == b"PROM-SECRET-VALUE"
        prometheus = await asyncio.to_thread(prometheus_server, [f"127.0.0.1:{port}"])
        await asyncio.to_thread(prometheus.wait_for_target_up, 30)

        async def value(expr: str) -> float:
            for _ in range(60):
                result = await asyncio.to_thread(prometheus.query, expr)
                if result:
                    return float(result[0]["value"][1])
                await asyncio.sleep(0.5)
            raise AssertionError(f"no sample for {expr}")

        assert await value("secrets_agent_ready") == 1
        assert await value("secrets_agent_cache_secrets") == 1
        assert await value('sum(secrets_agent_decrypts_total{outcome="ok"})') >= 1
        assert await value('sum(secrets_agent_key_operations_total{operation="unwrap"})') >= 1
        assert await value('sum(secrets_agent_http_requests_total{status="200"})') >= 1
        labels = await asyncio.to_thread(prometheus.query, '{__name__=~"secrets_agent_.*"}')
        assert labels
        assert all("PROM-SECRET-VALUE" not in str(series["metric"]) for series in labels)
