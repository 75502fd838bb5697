"""SecretWriter.put_many: the batched write behind ``import`` (issue 13)."""

from __future__ import annotations

import os
from typing import Any

import pytest

from agent import fsutil
from agent.core import Core
from agent.errors import InvalidName
from agent.types import CURRENT, PREVIOUS
from tests.agentenv import AgentEnv


@pytest.fixture
async def core(env: AgentEnv) -> Any:
    c = Core.build(env.config())
    yield c
    await c.aclose()


def _count_syncs(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    counts = {"fsync": 0, "syncfs": 0}
    real_fsync, real_syncfs = os.fsync, fsutil.sync_filesystem

    def fsync(fd: int) -> None:
        counts["fsync"] += 1
        real_fsync(fd)

    def syncfs(path: Any) -> None:
        counts["syncfs"] += 1
        real_syncfs(path)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr("agent.stores.file.sync_filesystem", syncfs)
    return counts


async def test_new_secrets_are_written_with_two_syncs_per_batch_and_read_back(
    core: Core, monkeypatch: pytest.MonkeyPatch
) -> None:
    counts = _count_syncs(monkeypatch)
    items = [(f"bulk/s{i:03d}", f"value-{i}".encode()) for i in range(50)]
    results = await core.writer().put_many(items)
    assert counts == {"fsync": 0, "syncfs": 2}
    for (name, value), result in zip(items, results, strict=True):
        assert not isinstance(result, Exception), result
        assert result.stages == (CURRENT,)
        # Read back through the resolver and the stage guard: each map carries its proof.
        state = await core.resolver.stages(name)
        assert state.proof is not None
        secret = await core.resolver.fetch(name, state.stages[CURRENT])
        assert secret.value.reveal() == value


async def test_a_map_in_service_is_replaced_with_its_own_sync_and_keeps_previous(
    core: Core, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = await core.writer().put("bulk/old", b"old")
    counts = _count_syncs(monkeypatch)
    [result] = await core.writer().put_many([("bulk/old", b"new")])
    assert not isinstance(result, Exception)
    # The replaced map was fsynced (file and directory), not left to the batch sync.
    assert counts["fsync"] >= 2 and counts["syncfs"] == 2
    state = await core.resolver.stages("bulk/old")
    assert state.stages[CURRENT] == result.version_id
    assert state.stages[PREVIOUS] == first.version_id


async def test_a_bad_item_is_reported_in_place_and_the_others_are_written(core: Core) -> None:
    results = await core.writer().put_many(
        [("bulk/a", b"a"), ("bad//name", b"x"), ("bulk/b", b"b")]
    )
    assert isinstance(results[1], InvalidName)
    assert not isinstance(results[0], Exception) and not isinstance(results[2], Exception)
    assert (await core.resolver.fetch("bulk/b", results[2].version_id)).value.reveal() == b"b"
