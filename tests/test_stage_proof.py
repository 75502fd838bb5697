"""Authenticated stage moves, on the directory store and on a real etcd.

A store writer without master keys (here: the test, writing the store
directly) tries a hand-edited rollback, a stage map copied from another
secret and a replayed old stage map: each is refused, the newer version stays
in service, and the refusal is logged, audited, counted and shown in status.
``promote`` of an older version (a rollback made with a key) is served, and
concurrent writers still converge on one proven map.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest

from agent.cache import SecretCache
from agent.core import Core
from agent.crypto import stageproof
from agent.errors import Conflict, VersionNotFound
from agent.metrics import Metrics
from agent.reencrypt import Reencryptor
from agent.stageguard import StageGuard, StageMapRefused
from tests.agentenv import AgentEnv

pytestmark = pytest.mark.integration


class Recorder:
    """An Auditor that keeps records in memory."""

    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = []

    def record(self, event: str, **fields: Any) -> None:
        self.records.append({"event": event, **fields})


@pytest.fixture(params=["file", "etcd"])
async def core(request: pytest.FixtureRequest, env: AgentEnv) -> AsyncIterator[Core]:
    if request.param == "etcd":
        server = request.getfixturevalue("etcd_server")
        env.configure(
            store={
                "type": "etcd",
                "endpoints": [server.endpoint],
                "prefix": f"/proof-{uuid.uuid4().hex[:8]}",
                "timeout": "5s",
            }
        )
    built = Core.build(env.config())
    try:
        yield built
    finally:
        await built.aclose()


def _cache(core: Core) -> tuple[SecretCache, Recorder]:
    recorder = Recorder()
    assert core.resolver.guard is not None
    core.resolver.guard.audit = recorder
    cache = SecretCache(core.resolver, settings=core.config.refresh, metrics=core.metrics)
    return cache, recorder


async def _served(cache: SecretCache, name: str) -> bytes:
    await cache.refresh(name)
    return (await cache.get(name)).secret.value.reveal()


def _refused(core: Core, reason: str) -> float:
    value = core.metrics.registry.get_sample_value(
        "secrets_agent_stage_maps_refused_total", {"reason": reason}
    )
    return value or 0.0


def _status(core: Core) -> list[dict[str, Any]]:
    assert core.resolver.guard is not None
    entries: list[dict[str, Any]] = core.resolver.guard.status()["stage_maps_refused"]
    return entries


async def test_a_hand_edited_rollback_is_refused_and_the_newer_version_stays(
    core: Core, caplog: pytest.LogCaptureFixture
) -> None:
    writer = core.writer()
    v1 = (await writer.put("db", b"revoked-password")).version_id
    v2 = (await writer.put("db", b"new-password")).version_id
    cache, recorder = _cache(core)
    assert await _served(cache, "db") == b"new-password"

    state = await core.store.read_stages("db")
    # The attacker keeps the genuine proof and swaps CURRENT and PREVIOUS.
    await core.store.set_stages(
        "db", {"CURRENT": v1, "PREVIOUS": v2}, expected_revision=state.revision, proof=state.proof
    )
    with caplog.at_level(logging.WARNING, logger="agent.stageguard"):
        assert await _served(cache, "db") == b"new-password"
        assert await _served(cache, "db") == b"new-password"  # still, and logged once
    assert _refused(core, "mismatch") == 1
    assert [r["event"] for r in recorder.records] == ["stage_map_refused"]
    (entry,) = _status(core)
    assert entry["secret"] == "db" and entry["serving_version"] == v2
    assert len([r for r in caplog.records if "does not match its proof" in r.message]) == 1

    # Dropping the proof altogether is refused too.
    state = await core.store.read_stages("db")
    await core.store.set_stages(
        "db", {"CURRENT": v1, "PREVIOUS": v2}, expected_revision=state.revision
    )
    assert await _served(cache, "db") == b"new-password"
    assert _refused(core, "unproven") == 1


async def test_a_stage_map_copied_from_another_secret_is_refused(core: Core) -> None:
    writer = core.writer()
    await writer.put("app/a", b"a1")
    await writer.put("app/a", b"a2")
    b1 = (await writer.put("app/b", b"b1")).version_id
    b2 = (await writer.put("app/b", b"b2")).version_id
    cache, _ = _cache(core)
    assert await _served(cache, "app/a") == b"a2"

    # Copy b's versions (their envelopes) and b's proven stage map into a.
    for vid in (b1, b2):
        stored = await core.store.read_version("app/b", vid)
        await core.store.write_version("app/a", vid, stored.envelope)
    b_state = await core.store.read_stages("app/b")
    a_state = await core.store.read_stages("app/a")
    await core.store.set_stages(
        "app/a", b_state.stages, expected_revision=a_state.revision, proof=b_state.proof
    )
    assert await _served(cache, "app/a") == b"a2"
    # The proof's key version holds an envelope sealed for app/b: refused before any MAC.
    assert _refused(core, "invalid") == 1
    (entry,) = _status(core)
    assert "cannot be opened" in entry["message"]


async def test_a_replayed_old_stage_map_is_refused(core: Core) -> None:
    writer = core.writer()
    await writer.put("db", b"one")
    old = await core.store.read_stages("db")
    await writer.put("db", b"two")
    cache, recorder = _cache(core)
    assert await _served(cache, "db") == b"two"

    current = await core.store.read_stages("db")
    await core.store.set_stages(
        "db", old.stages, expected_revision=current.revision, proof=old.proof
    )
    assert await _served(cache, "db") == b"two"
    assert _refused(core, "replayed") == 1
    assert recorder.records[0]["reason"].startswith("stage map of secret 'db' is older")


async def test_promote_of_an_older_version_is_an_authenticated_rollback_and_is_served(
    core: Core,
) -> None:
    writer = core.writer()
    v1 = (await writer.put("db", b"one")).version_id
    await writer.put("db", b"two")
    cache, recorder = _cache(core)
    assert await _served(cache, "db") == b"two"
    await writer.promote("db", "CURRENT", v1)
    assert await _served(cache, "db") == b"one"
    assert recorder.records == [] and _status(core) == []


async def test_a_map_refused_before_anything_is_in_service_is_not_served(core: Core) -> None:
    writer = core.writer()
    v1 = (await writer.put("db", b"one")).version_id
    await writer.put("db", b"two")
    state = await core.store.read_stages("db")
    await core.store.set_stages("db", {"CURRENT": v1}, expected_revision=state.revision)
    cache, _ = _cache(core)
    with pytest.raises(StageMapRefused, match="carries no proof"):
        await cache.get("db")


async def test_concurrent_writers_converge_on_one_proven_map(core: Core) -> None:
    writers = [core.writer() for _ in range(4)]
    await writers[0].put("db", b"seed")

    async def rotate(i: int) -> None:
        for j in range(3):
            for _attempt in range(50):
                vid = f"w{i}-{j}-{uuid.uuid4().hex[:6]}"
                try:
                    await writers[i].put("db", f"{i}-{j}".encode(), version_id=vid)
                    break
                except Conflict:
                    # Written but not staged: stage it (another CAS, retried).
                    try:
                        await writers[i].promote("db", "CURRENT", vid)
                        break
                    except Conflict:
                        await asyncio.sleep(0.001 * (i + 1))

    await asyncio.gather(*(rotate(i) for i in range(4)))
    state = await core.store.read_stages("db")
    assert state.proof is not None
    proof = stageproof.parse(state.proof)
    assert proof.key_version == state.stages["CURRENT"]
    cache, recorder = _cache(core)
    stored = await core.resolver.fetch("db", state.stages["CURRENT"])
    assert await _served(cache, "db") == stored.value.reveal()
    assert recorder.records == []


async def test_upgrade_unproven_maps_are_refused_until_signed_or_explicitly_accepted(
    core: Core,
) -> None:
    """An old store's maps carry no proof: refused by default, accepted with
    ``store.accept_unproven_stages``, and signed by ``reencrypt``."""
    writer = core.writer()
    vid = (await writer.put("db", b"old-store")).version_id
    state = await core.store.read_stages("db")
    await core.store.set_stages("db", {"CURRENT": vid}, expected_revision=state.revision)
    cache, _ = _cache(core)
    with pytest.raises(StageMapRefused, match="accept_unproven_stages"):
        await cache.get("db")

    lenient = StageGuard(core.store, core.datakeys, metrics=Metrics(), accept_unproven=True)
    assert (await lenient.check("db", await core.store.read_stages("db"))).stages == {
        "CURRENT": vid
    }

    # A routine reencrypt does not vouch for a map without proof: a store
    # writer may have dropped the proof along with a rollback.
    report = await Reencryptor(core, list(core.config.write_keys)).run(["db"])
    assert (report.signed, report.unproven) == (0, 1)
    assert (await core.store.read_stages("db")).proof is None
    # During the upgrade (accept_unproven_stages) it signs the map as it stands.
    config = core.config
    store = config.store.model_copy(update={"accept_unproven_stages": True})
    upgrading = dataclasses.replace(core, config=config.model_copy(update={"store": store}))
    report = await Reencryptor(upgrading, list(core.config.write_keys)).run(["db"])
    assert report.signed == 1
    signed = await core.store.read_stages("db")
    assert signed.stages == {"CURRENT": vid} and signed.proof is not None
    fresh, _ = _cache(core)
    assert await _served(fresh, "db") == b"old-store"
    # Once a map had a proof, an unproven one is refused even by the lenient guard.
    assert await lenient.check("db", signed) == signed
    await core.store.set_stages("db", {"CURRENT": vid}, expected_revision=signed.revision)
    assert await lenient.check("db", await core.store.read_stages("db")) == signed


async def test_no_stage_move_is_built_on_a_hand_edited_map(core: Core) -> None:
    """A writer with keys does not sign a store writer's rollback along with its own move.

    Rotation adds PENDING to the map it reads: signing the whole map would
    vouch for a CURRENT the attacker rolled back, and every agent would serve
    it. The writer checks the map's proof first; on a map without valid proof
    only CURRENT may be moved, and the new map holds that version alone.
    """
    writer = core.writer()
    v1 = (await writer.put("db", b"revoked-password")).version_id
    v2 = (await writer.put("db", b"new-password")).version_id
    cache, recorder = _cache(core)
    assert await _served(cache, "db") == b"new-password"
    state = await core.store.read_stages("db")
    await core.store.set_stages(
        "db", {"CURRENT": v1, "PREVIOUS": v2}, expected_revision=state.revision, proof=state.proof
    )
    edited = await core.store.read_stages("db")
    versions = len(await core.store.list_versions("db"))

    with pytest.raises(StageMapRefused, match="refusing to move stages on top of it"):
        await writer.put("db", b"pending", stage="PENDING")
    with pytest.raises(StageMapRefused, match="does not match its proof"):
        await writer.apply_stages(
            "db", {**edited.stages, "PENDING": v2}, expected_revision=edited.revision
        )
    with pytest.raises(StageMapRefused):
        await writer.promote("db", "PREVIOUS", v1)
    assert await core.store.read_stages("db") == edited
    assert len(await core.store.list_versions("db")) == versions  # nothing written
    assert await _served(cache, "db") == b"new-password"

    # The way back: a move of CURRENT starts a new map with that version alone.
    await writer.promote("db", "CURRENT", v2)
    assert (await core.store.read_stages("db")).stages == {"CURRENT": v2}
    assert await _served(cache, "db") == b"new-password"
    v3 = (await writer.put("db", b"rotated")).version_id
    assert (await core.store.read_stages("db")).stages == {"CURRENT": v3, "PREVIOUS": v2}
    assert await _served(cache, "db") == b"rotated"
    assert [r["event"] for r in recorder.records] == ["stage_map_refused"]


async def test_a_move_built_on_a_replayed_map_is_refused(core: Core) -> None:
    """A replayed old map has a valid proof, so a writer builds on it. Adding PENDING
    keeps the replayed CURRENT: the proof names the map it kept it from, older
    than the map in service, and the agent refuses it. A move that sets
    CURRENT itself (``promote``) is served."""
    writer = core.writer()
    v1 = (await writer.put("db", b"revoked-password")).version_id
    old = await core.store.read_stages("db")
    v2 = (await writer.put("db", b"new-password")).version_id
    cache, recorder = _cache(core)
    assert await _served(cache, "db") == b"new-password"
    current = await core.store.read_stages("db")
    await core.store.set_stages(
        "db", old.stages, expected_revision=current.revision, proof=old.proof
    )
    assert await _served(cache, "db") == b"new-password"
    # Rotation's first step, on top of the replayed map: CURRENT stays v1 in it.
    await writer.put("db", b"pending", stage="PENDING")
    laundered = await core.store.read_stages("db")
    assert laundered.stages["CURRENT"] == v1 and laundered.proof is not None
    proof = stageproof.parse(laundered.proof)
    assert proof.base == stageproof.parse(old.proof or "").sequence
    assert await _served(cache, "db") == b"new-password"
    assert _refused(core, "replayed") == 2
    assert "keeps CURRENT from an older map" in _status(core)[0]["message"]
    assert len(recorder.records) == 2
    # An explicit promote is built on the map in the store, now newer: served.
    await writer.promote("db", "CURRENT", v2)
    assert await _served(cache, "db") == b"new-password"
    assert _status(core) == []
    with pytest.raises(VersionNotFound):
        await writer.promote("db", "CURRENT", "no-such-version")


async def test_on_a_store_with_non_atomic_label_moves_an_unproven_map_is_looked_at_twice(
    core: Core, monkeypatch: pytest.MonkeyPatch
) -> None:
    """AWS moves labels one call at a time, the proof following: a writer that
    sees a map without valid proof waits and reads it again. Moved meanwhile:
    Conflict (another writer's move, retry). Unchanged: an edited map, as anywhere."""
    monkeypatch.setattr(core.store, "stage_moves_atomic", False, raising=False)
    writer = core.writer()
    v1 = (await writer.put("db", b"one")).version_id
    v2 = (await writer.put("db", b"two")).version_id
    state = await core.store.read_stages("db")
    await core.store.set_stages(
        "db", {"CURRENT": v1, "PREVIOUS": v2}, expected_revision=state.revision, proof=state.proof
    )
    writer.settle = 0.3
    other = core.writer()
    other.settle = 0.0

    async def move_meanwhile() -> None:
        await asyncio.sleep(0.05)
        await other.promote("db", "CURRENT", v2)

    with pytest.raises(Conflict, match="changed while its proof was checked"):
        await asyncio.gather(writer.put("db", b"pending", stage="PENDING"), move_meanwhile())
    assert (await core.store.read_stages("db")).stages == {"CURRENT": v2}

    state = await core.store.read_stages("db")
    await core.store.set_stages(
        "db", {"CURRENT": v1}, expected_revision=state.revision, proof=state.proof
    )
    writer.settle = 0.01
    with pytest.raises(StageMapRefused, match="refusing to move stages on top of it"):
        await writer.put("db", b"pending", stage="PENDING")


async def test_a_map_whose_key_version_was_pruned_after_a_move_is_no_false_alarm(
    core: Core,
) -> None:
    """A reader (or writer) that read a map just before another writer moved the
    stages and pruned the map's key version checks the new map, not refuses the old."""
    writer = core.writer()
    await writer.put("db", b"one")
    v2 = (await writer.put("db", b"two")).version_id
    _, recorder = _cache(core)
    read_before = await core.store.read_stages("db")  # keyed by v2, not yet checked
    await writer.put("db", b"three", stage="PENDING")
    v3 = (await core.store.read_stages("db")).stages["PENDING"]
    await writer.promote("db", "CURRENT", v3)
    await writer.promote("db", "PREVIOUS", v3)  # v2 is now unstaged
    await core.store.delete_version("db", v2)
    assert core.resolver.guard is not None
    checked = await core.resolver.guard.check("db", read_before)
    assert checked.stages["CURRENT"] == v3
    assert recorder.records == [] and _status(core) == []
    assert _refused(core, "invalid") == 0


def _store_config(kind: str, request: pytest.FixtureRequest) -> dict[str, Any]:
    tag = uuid.uuid4().hex[:8]
    if kind == "etcd":
        server = request.getfixturevalue("etcd_server")
        return {"type": "etcd", "endpoints": [server.endpoint], "prefix": f"/p-{tag}"}
    moto = request.getfixturevalue("moto_server")
    if kind == "s3":
        import boto3

        bucket = f"proof-{tag}"
        boto3.client("s3", region_name="us-east-1", endpoint_url=moto.endpoint_url).create_bucket(
            Bucket=bucket
        )
        return {
            "type": "s3",
            "bucket": bucket,
            "region": "us-east-1",
            "endpoint_url": moto.endpoint_url,
        }
    if kind == "aws-secretsmanager":
        return {
            "type": "aws-secretsmanager",
            "region": "us-east-1",
            "endpoint_url": moto.endpoint_url,
            "name_prefix": f"proof-{tag}/",
        }
    return {"type": "file", "path": "./store"}


@pytest.mark.parametrize("kind", ["file", "etcd", "s3", "aws-secretsmanager"])
async def test_every_store_keeps_the_proof_and_a_replayed_map_is_refused(
    kind: str, env: AgentEnv, request: pytest.FixtureRequest
) -> None:
    """All four stores carry the proof (AWS in a tag); a replay is refused, a promote served."""
    env.configure(store=_store_config(kind, request))
    core = Core.build(env.config())
    try:
        writer = core.writer()
        v1 = (await writer.put("db", b"one")).version_id
        old = await core.store.read_stages("db")
        await writer.put("db", b"two")
        cache, recorder = _cache(core)
        assert await _served(cache, "db") == b"two"
        assert old.proof is not None and stageproof.parse(old.proof).key_version == v1

        if kind == "aws-secretsmanager":
            _aws_replay(core, request, v1, old.proof)
        else:
            current = await core.store.read_stages("db")
            await core.store.set_stages(
                "db", old.stages, expected_revision=current.revision, proof=old.proof
            )
        # Twice: AWS label moves are not atomic, so a bad map is reported at its second sight.
        assert await _served(cache, "db") == b"two"
        assert await _served(cache, "db") == b"two"
        reasons = ("replayed", "mismatch")
        assert sum(_refused(core, r) for r in reasons) == 1
        assert [r["event"] for r in recorder.records] == ["stage_map_refused"]

        await writer.promote("db", "CURRENT", v1)
        assert await _served(cache, "db") == b"one"
        assert _status(core) == []
    finally:
        await core.aclose()


def _aws_replay(core: Core, request: pytest.FixtureRequest, v1: str, proof: str) -> None:
    """As a writer with IAM rights but no key would: move AWSCURRENT back, put the old tag."""
    import boto3

    from agent.stores.aws_sm import PROOF_TAG, to_token

    moto = request.getfixturevalue("moto_server")
    sm = boto3.client("secretsmanager", region_name="us-east-1", endpoint_url=moto.endpoint_url)
    secret_id = f"{core.config.store.name_prefix}db"  # type: ignore[union-attr]
    labels = sm.describe_secret(SecretId=secret_id)["VersionIdsToStages"]
    current = next(t for t, ls in labels.items() if "AWSCURRENT" in ls)
    sm.update_secret_version_stage(
        SecretId=secret_id,
        VersionStage="AWSCURRENT",
        MoveToVersionId=to_token(v1),
        RemoveFromVersionId=current,
    )
    sm.tag_resource(SecretId=secret_id, Tags=[{"Key": PROOF_TAG, "Value": proof}])
