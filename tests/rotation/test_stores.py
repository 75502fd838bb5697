"""Rotation on every writable store: five agents racing with one slot token converge."""

from __future__ import annotations

import asyncio
import uuid

import pytest

from agent.config import DataKeysConfig
from agent.crypto.datakeys import DataKeys
from agent.errors import BackendUnavailable
from agent.metrics import Metrics
from agent.resolver import Resolver
from agent.rotation.base import RotationFailed
from agent.rotation.engine import RotationEngine, RotationResult
from agent.stores.base import WritableStore
from agent.types import CURRENT, PENDING, PREVIOUS
from agent.writer import SecretWriter
from tests.fakes import FakeKeyProvider
from tests.rotation.helpers import ScriptedRotator
from tests.stores.conftest import StoreFactory

AGENTS = 5
#: Fewer on the AWS kinds: each aiobotocore client costs 1-3 s to build on the
#: shared 2-core machine, and three racing clients show convergence as well.
AGENTS_ON_AWS = 3


def engine_on(store: WritableStore, provider: FakeKeyProvider) -> RotationEngine:
    keys = DataKeys(
        {"local": provider}, write_keys=["local"], settings=DataKeysConfig(), metrics=Metrics()
    )
    return RotationEngine(SecretWriter(store, keys), Resolver(store, keys, metrics=Metrics()))


async def test_agents_racing_on_one_store_make_exactly_one_new_version(
    store_factory: StoreFactory, request: pytest.FixtureRequest
) -> None:
    kind = request.node.callspec.params["store_factory"]
    agents = AGENTS_ON_AWS if kind in ("s3", "aws-secretsmanager") else AGENTS
    provider = FakeKeyProvider("local")
    stores = [await store_factory(namespace="shared") for _ in range(agents)]
    engines = [engine_on(s, provider) for s in stores]
    first = (await engines[0].writer.put("app/db", b"initial")).version_id
    token = str(uuid.uuid4())  # a slot's token: the same in every agent
    gate = asyncio.Event()
    rotators = [ScriptedRotator(f"value-{i}".encode()) for i in range(agents)]

    async def hold(step: str) -> None:
        if step == "create":
            await gate.wait()

    for r in rotators:
        r.hook = hold

    async def rotate(engine: RotationEngine, rotator: ScriptedRotator) -> RotationResult:
        # As the scheduler does: a transient error (the stage map kept changing
        # under the other agents' moves; on AWS a move is one call per label)
        # is tried again after a pause. What must hold is the convergence.
        for attempt in range(5):
            try:
                return await engine.rotate("app/db", rotator, token=token)
            except BackendUnavailable:
                await asyncio.sleep(0.2 * (attempt + 1))
        return await engine.rotate("app/db", rotator, token=token)

    tasks = [asyncio.create_task(rotate(e, r)) for e, r in zip(engines, rotators, strict=True)]
    await asyncio.sleep(0.05)
    gate.set()
    results = await asyncio.gather(*tasks)
    assert {r.token for r in results} == {token}
    assert sum(r.outcome == "rotated" for r in results) >= 1
    versions = {v for v, _ in await stores[0].list_versions("app/db")}
    assert versions == {first, token}
    state = await stores[0].read_stages("app/db")
    assert dict(state.stages) == {CURRENT: token, PREVIOUS: first}
    winner = (await engines[0].resolver.fetch("app/db", token)).value.reveal()
    assert winner in {f"value-{i}".encode() for i in range(agents)}
    for r in rotators:
        for ctx in r.seen:
            if ctx.pending is not None:
                assert ctx.pending.reveal() == winner


@pytest.mark.integration
async def test_on_secrets_manager_the_rotation_uses_aws_stage_labels(
    moto_server: object,
) -> None:
    import boto3

    from agent.stores.aws_sm import SecretsManagerStore, to_token

    endpoint = moto_server.endpoint_url  # type: ignore[attr-defined]
    prefix = f"rot-{uuid.uuid4().hex[:8]}/"
    store = SecretsManagerStore(
        store_id="test", region="us-east-1", endpoint_url=endpoint, name_prefix=prefix
    )
    try:
        engine = engine_on(store, FakeKeyProvider("local"))
        first = (await engine.writer.put("app/db", b"initial")).version_id
        token = str(uuid.uuid4())
        rotator = ScriptedRotator(b"rotated")
        rotator.fail["test"] = RotationFailed("not yet")
        with pytest.raises(RotationFailed):
            await engine.rotate("app/db", rotator, token=token)
        aws = boto3.client("secretsmanager", region_name="us-east-1", endpoint_url=endpoint)

        def labels() -> dict[str, list[str]]:
            doc = aws.describe_secret(SecretId=f"{prefix}app/db")
            return {k: sorted(v) for k, v in doc["VersionIdsToStages"].items()}

        mid = labels()
        assert "AWSPENDING" in mid[to_token(token)] and "AWSCURRENT" in mid[to_token(first)]
        assert (await store.read_stages("app/db")).stages[PENDING] == token
        rotator.fail.clear()
        await engine.rotate("app/db", rotator, token=token)
        after = labels()
        assert "AWSCURRENT" in after[to_token(token)]
        assert "AWSPREVIOUS" in after[to_token(first)]
        assert not any("AWSPENDING" in v for v in after.values())
    finally:
        await store.aclose()
