"""Retention: staged versions are never pruned; unstaged ones beyond the policy are."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from agent.config import DataKeysConfig
from agent.crypto.datakeys import DataKeys
from agent.metrics import Metrics
from agent.retention import RetentionPolicy, prune, to_prune
from agent.writer import SecretWriter
from tests.agentenv import AgentEnv
from tests.fakes import FakeKeyProvider, MemoryStore

NOW = datetime(2026, 12, 1, tzinfo=UTC)


def _versions(*ages_days: int) -> list[tuple[str, datetime]]:
    return [(f"v{i}", NOW - timedelta(days=age)) for i, age in enumerate(ages_days, 1)]


def test_staged_versions_are_kept_and_the_newest_unstaged_ones_too() -> None:
    versions = _versions(50, 40, 30, 20, 10)
    stages = {"CURRENT": "v5", "PREVIOUS": "v4", "CUSTOM": "v1"}
    assert to_prune(versions, stages, RetentionPolicy(keep_unstaged=1), now=NOW) == ["v2"]
    assert to_prune(versions, stages, RetentionPolicy(keep_unstaged=0), now=NOW) == ["v2", "v3"]
    assert to_prune(versions, stages, RetentionPolicy(keep_unstaged=None), now=NOW) == []


def test_max_age_prunes_old_unstaged_versions_whatever_the_count() -> None:
    versions = _versions(50, 40, 30, 20, 10)
    policy = RetentionPolicy(keep_unstaged=None, max_age=35 * 86400)
    assert to_prune(versions, {"CURRENT": "v1"}, policy, now=NOW) == ["v2"]
    both = RetentionPolicy(keep_unstaged=3, max_age=35 * 86400)
    assert to_prune(versions, {"CURRENT": "v5"}, both, now=NOW) == ["v1", "v2"]


async def test_each_put_prunes_its_secret_and_old_values_stay_readable_while_staged() -> None:
    store = MemoryStore()
    datakeys = DataKeys(
        {"local": FakeKeyProvider("local")},
        write_keys=["local"],
        settings=DataKeysConfig(),
        metrics=Metrics(),
    )
    writer = SecretWriter(store, datakeys, retention=RetentionPolicy(keep_unstaged=1))
    ids = [(await writer.put("db", f"value {i}".encode())).version_id for i in range(6)]
    listed = [v for v, _ in await store.list_versions("db")]
    # CURRENT and PREVIOUS (the two newest) plus one unstaged version
    assert listed == ids[-3:]
    assert dict((await store.read_stages("db")).stages) == {"CURRENT": ids[-1], "PREVIOUS": ids[-2]}


async def test_prune_skips_a_version_staged_after_it_was_listed() -> None:
    store = MemoryStore()
    for vid in ("v1", "v2", "v3"):
        await store.write_version("db", vid, b"x")
    await store.set_stages("db", {"CURRENT": "v3"}, expected_revision="")
    original = store.delete_version

    async def stage_first(name: str, version_id: str) -> None:
        if version_id == "v1":  # a writer stages v1 between the listing and the delete
            state = await store.read_stages(name)
            await store.set_stages(
                name, {"CURRENT": "v3", "OLD": "v1"}, expected_revision=state.revision
            )
        await original(name, version_id)

    store.delete_version = stage_first  # type: ignore[method-assign]
    pruned = await prune(store, "db", RetentionPolicy(keep_unstaged=0), now=NOW)
    assert pruned == ["v2"]
    assert [v for v, _ in await store.list_versions("db")] == ["v1", "v3"]


def test_cli_prune_dry_run_then_prune(env: AgentEnv) -> None:
    env.configure(retention={"keep_unstaged": None})
    ids = [env.put("app/db", f"value {i}") for i in range(5)]
    code, out, err = env.cli("prune", "--all", "--keep", "1", "--dry-run")
    assert code == 0, err
    assert f"app/db: would prune 2 version(s): {ids[0]} {ids[1]}" in out
    code, out, _ = env.cli("describe", "app/db", "--json")
    assert out.count('"version_id"') == 5
    code, out, err = env.cli("prune", "app/db", "--keep", "1")
    assert code == 0, err
    assert "pruned 2 version(s) of 1 secret(s)" in out
    code, out, _ = env.cli("describe", "app/db", "--json")
    assert out.count('"version_id"') == 3
    code, out, _ = env.cli("get", "app/db", "--stage", "PREVIOUS")
    assert out.strip() == "value 3"


@pytest.mark.parametrize(
    ("args", "message"),
    [((), "name secrets, or pass --all"), (("--all", "--keep", "-1"), "0 or more")],
)
def test_cli_prune_usage_errors(env: AgentEnv, args: tuple[str, ...], message: str) -> None:
    code, _, err = env.cli("prune", *args)
    assert code == 2
    assert message in err
