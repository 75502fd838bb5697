"""Delete, restore and purge on every writable store (they use only the store protocol)."""

from __future__ import annotations

import time

import pytest

from agent.config import DataKeysConfig
from agent.crypto.datakeys import DataKeys
from agent.deletion import PURGED, SecretDeleted, delete, deletion_of, purge, restore
from agent.errors import BadRequest, SecretNotFound
from agent.metrics import Metrics
from agent.resolver import Resolver
from agent.types import CURRENT, PREVIOUS
from agent.writer import SecretWriter
from tests.fakes import FakeKeyProvider
from tests.stores.conftest import StoreFactory


async def test_delete_restore_and_purge(store_factory: StoreFactory) -> None:
    store = await store_factory()
    keys = DataKeys(
        {"local": FakeKeyProvider("local")},
        write_keys=["local"],
        settings=DataKeysConfig(),
        metrics=Metrics(),
    )
    writer, resolver = SecretWriter(store, keys), Resolver(store, keys, metrics=Metrics())
    a = (await writer.put("app/e", b"one")).version_id
    b = (await writer.put("app/e", b"two")).version_id
    if "stage_deletion" in getattr(store, "lacks", ()):
        # AWS Secrets Manager: refused with a pointer to AWS's own DeleteSecret.
        for attempt in (delete(writer, "app/e", window=3600), purge(writer, "app/e")):
            with pytest.raises(BadRequest, match="DeleteSecret"):
                await attempt
        assert dict((await store.read_stages("app/e")).stages) == {CURRENT: b, PREVIOUS: a}
        return

    until = await delete(writer, "app/e", window=3600)
    assert abs(until - time.time() - 3600) < 60
    with pytest.raises(SecretNotFound, match="scheduled for deletion"):
        await resolver.stages("app/e")
    with pytest.raises(SecretDeleted):
        await writer.put("app/e", b"three")
    assert {v for v, _ in await store.list_versions("app/e")} == {a, b}

    restored = await restore(writer, "app/e")
    assert dict(restored.stages) == {CURRENT: b, PREVIOUS: a}
    assert (await resolver.stages("app/e")).stages[CURRENT] == b
    assert (await resolver.fetch("app/e", b)).value.reveal() == b"two"

    await delete(writer, "app/e", window=3600)
    assert await purge(writer, "app/e") == 2
    state = await store.read_stages("app/e")
    gone = deletion_of(state.stages)
    assert gone is not None and gone.purged and set(state.stages) == {PURGED}
    assert [v for v, _ in await store.list_versions("app/e")] == [state.stages[PURGED]]
    with pytest.raises(SecretNotFound, match="was deleted"):
        await resolver.stages("app/e")
    # The name starts afresh.
    c = (await writer.put("app/e", b"fresh")).version_id
    assert dict((await resolver.stages("app/e")).stages) == {CURRENT: c}
