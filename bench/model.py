"""A model of 10,000 agents, built from the per-agent costs measured in the same run."""

from __future__ import annotations

from typing import Any

AGENTS = 10_000
#: refresh.interval and refresh.watch_interval defaults (agent/config.py).
POLL_INTERVAL_S = 60.0
WATCH_POLL_INTERVAL_S = 300.0
#: AWS Secrets Manager: USD per 10,000 API calls (us-east-1 list price).
AWS_PER_10K_CALLS = 0.05
MONTH_S = 30 * 86400


def fleet_model(results: dict[str, Any], *, secrets_per_agent: int = 10) -> dict[str, Any]:
    """Per-rotation and steady-state costs of ``AGENTS`` agents.

    * etcd: one watch stream per agent; per rotation each agent reads the stage
      map and one envelope (the bytes measured in the cold-start store);
      steady state: the idle request rate per agent measured in the fleet run.
    * memory: the RSS of an agent holding ``secrets_per_agent`` secrets
      (the smallest cold-start run), times the fleet.
    * AWS Secrets Manager (no push): each agent checks each secret once per
      ``refresh.interval`` (one DescribeSecret), plus one GetSecretValue per
      agent and rotation.
    """
    fleet = results.get("fleet") or {}
    agents_measured = fleet.get("agents") or 0
    idle_rps = fleet.get("idle_rps")
    per_agent_idle = (
        idle_rps / agents_measured if idle_rps is not None and agents_measured else None
    )
    cold = [r for r in results.get("coldstart") or [] if isinstance(r, dict)]
    smallest = min(cold, key=lambda r: r["secrets"]) if cold else None
    rss_mb = smallest["rss_mb"] if smallest else None
    envelope_bytes = results.get("envelope_bytes", 700)
    per_rotation_bytes = envelope_bytes + 200  # the envelope, the stage map and framing
    checks_per_month = AGENTS * secrets_per_agent * MONTH_S / POLL_INTERVAL_S
    return {
        "agents": AGENTS,
        "secrets_per_agent": secrets_per_agent,
        "etcd_watch_streams": AGENTS,
        "etcd_idle_requests_per_s": per_agent_idle * AGENTS if per_agent_idle is not None else None,
        "etcd_reads_per_rotation": 2 * AGENTS,
        "bytes_per_rotation": per_rotation_bytes * AGENTS,
        "agent_rss_mb": rss_mb,
        "fleet_rss_gb": rss_mb * AGENTS / 1024 if rss_mb is not None else None,
        "aws_calls_per_month": checks_per_month,
        "aws_cost_per_month_usd": checks_per_month / 10_000 * AWS_PER_10K_CALLS,
        "aws_calls_per_rotation": AGENTS,
        "assumptions": (
            f"refresh.interval {POLL_INTERVAL_S:.0f}s, "
            f"watch_interval {WATCH_POLL_INTERVAL_S:.0f}s, "
            f"{secrets_per_agent} secrets per agent, ${AWS_PER_10K_CALLS} per 10k AWS API calls"
        ),
    }
