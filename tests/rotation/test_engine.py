"""The four-step engine on fakes: idempotence, resumption, convergence, records."""

from __future__ import annotations

import asyncio

import pytest

from agent.errors import BackendUnavailable
from agent.retention import RetentionPolicy
from agent.rotation.base import RotationFailed
from agent.types import CURRENT, PENDING, PREVIOUS
from tests.rotation.helpers import ScriptedRotator, World

STEPS = ["create", "set", "test", "finish"]


async def test_a_rotation_runs_the_four_steps_and_moves_the_stages_in_one_swap() -> None:
    world = World()
    old = await world.put("app/pw", b"old")
    rotator = ScriptedRotator(b"new")
    result = await world.engine().rotate("app/pw", rotator, token="tok-1", label="app/pw")
    assert result.outcome == "rotated" and result.steps == tuple(STEPS)
    state = await world.store.read_stages("app/pw")
    assert dict(state.stages) == {CURRENT: "tok-1", PREVIOUS: old}
    assert await world.current("app/pw") == b"new"
    assert [c for c, _ in rotator.calls] == ["create", "set", "test"]
    # set and test saw the pending value and the current one.
    ctx = rotator.seen[-1]
    assert ctx.pending is not None and ctx.pending.reveal() == b"new"
    assert ctx.current is not None and ctx.current.reveal() == b"old"
    assert ctx.current_version == old
    for step in STEPS:
        assert (
            world.sample(
                "secrets_agent_rotation_steps_total", secret="app/pw", step=step, outcome="ok"
            )
            == 1
        )
    assert world.sample("secrets_agent_rotations_total", secret="app/pw", outcome="rotated") == 1
    events = [(r["event"], r.get("stage"), r["outcome"]) for r in world.audit.records]
    assert events == [("rotation_step", s, "ok") for s in STEPS] + [("rotated", CURRENT, "ok")]


async def test_the_same_token_again_is_a_no_op() -> None:
    world = World()
    await world.put("app/pw", b"old")
    engine = world.engine()
    await engine.rotate("app/pw", ScriptedRotator(b"new"), token="tok-1")
    again = ScriptedRotator(b"other")
    result = await engine.rotate("app/pw", again, token="tok-1")
    assert result.outcome == "already_current" and again.calls == []
    assert await world.current("app/pw") == b"new"


@pytest.mark.parametrize("step", ["create", "set", "test"])
async def test_a_failed_step_leaves_current_untouched_and_the_next_attempt_resumes_there(
    step: str,
) -> None:
    world = World()
    old = await world.put("app/pw", b"old")
    engine = world.engine()
    rotator = ScriptedRotator(b"new")
    rotator.fail[step] = RotationFailed("target said no")
    with pytest.raises(RotationFailed) as info:
        await engine.rotate("app/pw", rotator, token="tok-1", label="app/pw")
    assert info.value.step == step
    state = await world.store.read_stages("app/pw")
    assert state.stages[CURRENT] == old
    assert (state.stages.get(PENDING) == "tok-1") == (step != "create")
    assert await world.current("app/pw") == b"old"
    assert (
        world.sample(
            "secrets_agent_rotation_steps_total", secret="app/pw", step=step, outcome="failed"
        )
        == 1
    )
    failed = [r for r in world.audit.records if r["outcome"] == "failed"]
    assert failed[0]["stage"] == step and failed[0]["reason"] == "target said no"

    rotator.fail.clear()
    rotator.calls.clear()
    result = await engine.rotate("app/pw", rotator, token="tok-1")
    assert result.outcome == "rotated"
    assert result.steps == tuple(STEPS[STEPS.index(step) :])
    assert await world.current("app/pw") == b"new"
    # The pending value was created once: create is not called again after step 1.
    assert ("create" in [c for c, _ in rotator.calls]) == (step == "create")


async def test_a_failed_finish_leaves_current_untouched_and_is_resumed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    world = World()
    old = await world.put("app/pw", b"old")
    engine = world.engine()
    real = engine.writer.apply_stages
    calls = 0

    async def flaky(name: str, stages: dict[str, str], *, expected_revision: str) -> object:
        nonlocal calls
        calls += 1
        if calls == 2:  # the first move stages PENDING; the second is finish
            raise BackendUnavailable("store down (test)")
        return await real(name, stages, expected_revision=expected_revision)

    monkeypatch.setattr(engine.writer, "apply_stages", flaky)
    with pytest.raises(BackendUnavailable):
        await engine.rotate("app/pw", ScriptedRotator(b"new"), token="tok-1", label="r")
    state = await world.store.read_stages("app/pw")
    assert state.stages[CURRENT] == old and state.stages[PENDING] == "tok-1"
    assert (
        world.sample(
            "secrets_agent_rotation_steps_total", secret="r", step="finish", outcome="unavailable"
        )
        == 1
    )
    rotator = ScriptedRotator(b"ignored")
    result = await engine.rotate("app/pw", rotator, token="tok-1")
    assert result.steps == ("finish",) and rotator.calls == []
    assert await world.current("app/pw") == b"new"


async def test_a_pending_left_behind_is_resumed_not_duplicated() -> None:
    world = World()
    await world.put("app/pw", b"old")
    crashed = ScriptedRotator(b"first")
    crashed.fail["set"] = RotationFailed("crash")
    with pytest.raises(RotationFailed):
        await world.engine().rotate("app/pw", crashed, token="tok-old")
    # Another process, asked for a new token, resumes the old PENDING instead.
    other = ScriptedRotator(b"second")
    result = await world.engine().rotate("app/pw", other, token="tok-new")
    assert result.token == "tok-old" and result.resumed
    assert result.steps == ("set", "test", "finish")
    assert await world.current("app/pw") == b"first"
    assert {v for v, _ in await world.store.list_versions("app/pw")} >= {"tok-old"}
    assert "tok-new" not in {v for v, _ in await world.store.list_versions("app/pw")}


async def test_a_pending_whose_version_file_is_gone_is_created_again_and_finished() -> None:
    """Found by acceptance testing: PENDING pointed at a version deleted by hand
    (or lost with a store restored from backup), and every attempt, scheduled or
    ``rotate``, failed with "version ... does not exist" for ever."""
    world = World()
    old = await world.put("app/pw", b"old")
    crashed = ScriptedRotator(b"first")
    crashed.fail["set"] = RotationFailed("crash")
    engine = world.engine()
    with pytest.raises(RotationFailed):
        await engine.rotate("app/pw", crashed, token="tok-1")
    del world.store._backend.secrets["app/pw"].versions["tok-1"]  # rm of the version file
    plan = await engine.plan("app/pw")
    assert plan.token == "tok-1" and plan.first_step == "create"
    again = ScriptedRotator(b"second")
    result = await engine.rotate("app/pw", again, token="tok-2")
    assert result.outcome == "rotated" and result.token == "tok-1"
    assert result.steps == tuple(STEPS)
    assert await world.current("app/pw") == b"second"
    state = await world.store.read_stages("app/pw")
    assert dict(state.stages) == {CURRENT: "tok-1", PREVIOUS: old}


async def test_a_version_written_but_not_staged_by_a_crash_is_staged_and_finished() -> None:
    world = World()
    await world.put("app/pw", b"old")
    engine = world.engine()
    envelope = await engine.writer.seal("app/pw", "tok-1", b"half", "string")
    await world.store.write_version("app/pw", "tok-1", envelope)  # crash before the stage move
    result = await engine.rotate("app/pw", ScriptedRotator(b"ignored"), token="tok-1")
    assert result.outcome == "rotated"
    assert await world.current("app/pw") == b"half"  # the version that exists wins


async def test_an_old_unstaged_token_is_not_rotated_back_in() -> None:
    world = World()
    await world.put("app/pw", b"v0")
    engine = world.engine()
    await engine.rotate("app/pw", ScriptedRotator(b"v1"), token="tok-1")
    await engine.rotate("app/pw", ScriptedRotator(b"v2"), token="tok-2")
    await engine.rotate("app/pw", ScriptedRotator(b"v3"), token="tok-3")
    result = await engine.rotate("app/pw", ScriptedRotator(b"v4"), token="tok-1")
    assert result.outcome == "superseded"
    assert await world.current("app/pw") == b"v3"


async def test_agents_racing_with_one_token_converge_on_one_version() -> None:
    world = World()
    await world.put("app/pw", b"old")
    engines = [world.engine() for _ in range(5)]
    rotators = [ScriptedRotator(f"value-{i}".encode()) for i in range(5)]
    gate = asyncio.Event()

    async def wait_at_create(step: str) -> None:
        if step == "create":
            await gate.wait()

    for r in rotators:
        r.hook = wait_at_create
    tasks = [
        asyncio.create_task(e.rotate("app/pw", r, token="slot-1"))
        for e, r in zip(engines, rotators, strict=True)
    ]
    await asyncio.sleep(0.05)
    gate.set()
    results = await asyncio.gather(*tasks)
    assert all(r.token == "slot-1" for r in results)
    versions = [v for v, _ in await world.store.list_versions("app/pw")]
    assert len(versions) == 2 and "slot-1" in versions
    winner = await world.current("app/pw")
    assert winner in {f"value-{i}".encode() for i in range(5)}
    # Every agent that ran set/test did so with the winning value.
    for r in rotators:
        for ctx in r.seen:
            if ctx.pending is not None:
                assert ctx.pending.reveal() == winner


async def test_an_unexpected_rotator_error_is_a_failed_step_without_its_message() -> None:
    world = World()
    await world.put("app/pw", b"old")
    rotator = ScriptedRotator(b"new")
    rotator.fail["test"] = KeyError("s3cr3t-value")
    with pytest.raises(RotationFailed) as info:
        await world.engine().rotate("app/pw", rotator, token="t")
    assert "s3cr3t" not in info.value.message and "KeyError" in info.value.message
    assert all("s3cr3t" not in str(r) for r in world.audit.records)


async def test_dry_run_plans_without_calling_the_rotator_or_writing() -> None:
    world = World()
    await world.put("app/pw", b"old")
    engine = world.engine()
    plan = await engine.plan("app/pw", token="tok-1")
    assert plan.first_step == "create" and not plan.resumed
    assert len(await world.store.list_versions("app/pw")) == 1
    rotator = ScriptedRotator()
    rotator.fail["test"] = RotationFailed("no")
    with pytest.raises(RotationFailed):
        await engine.rotate("app/pw", rotator, token="tok-1")
    plan = await engine.plan("app/pw", token="tok-2")
    assert plan.token == "tok-1" and plan.resumed and plan.first_step == "test"
    assert "resume PENDING" in plan.describe()


async def test_a_finished_rotation_prunes_old_unstaged_versions_by_the_retention_policy() -> None:
    world = World()
    first = await world.put("app/pw", b"v0")
    tokens = []
    for i in range(4):
        engine = world.engine()
        engine.writer.retention = RetentionPolicy(keep_unstaged=1)
        token = f"tok-{i}"
        await engine.rotate("app/pw", ScriptedRotator(f"v{i + 1}".encode()), token=token)
        tokens.append(token)
    listed = [v for v, _ in await world.store.list_versions("app/pw")]
    # CURRENT and PREVIOUS plus the newest unstaged one; the first version is gone
    assert listed == tokens[-3:]
    assert first not in listed
    assert dict((await world.store.read_stages("app/pw")).stages) == {
        CURRENT: "tok-3",
        PREVIOUS: "tok-2",
    }
