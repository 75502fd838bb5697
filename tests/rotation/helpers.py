"""A rotation world on fakes: a memory store, a fake key provider, engines over them."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from agent.config import DataKeysConfig
from agent.crypto.datakeys import DataKeys
from agent.errors import BackendUnavailable
from agent.metrics import Metrics
from agent.resolver import Resolver
from agent.rotation.base import RotationContext, RotationFailed
from agent.rotation.engine import RotationEngine
from agent.types import CURRENT
from agent.writer import SecretWriter
from tests.fakes import FakeKeyProvider, MemoryStore


class RecordingAudit:
    """An Auditor that keeps records in memory."""

    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = []

    def record(self, event: str, **fields: Any) -> None:
        self.records.append({"event": event, **fields})

    def status(self) -> dict[str, Any]:
        return {"enabled": True}

    def reopen(self) -> None:
        return None

    async def aclose(self) -> None:
        return None


class World:
    """One store; :meth:`engine` builds another agent's engine over the same data."""

    def __init__(self) -> None:
        self.store = MemoryStore()
        self.provider = FakeKeyProvider("local")
        self.metrics = Metrics()
        self.audit = RecordingAudit()

    def engine(self, *, metrics: Metrics | None = None) -> RotationEngine:
        keys = DataKeys(
            {"local": self.provider},
            write_keys=["local"],
            settings=DataKeysConfig(),
            metrics=Metrics(),
        )
        store = self.store.twin()
        return RotationEngine(
            SecretWriter(store, keys),
            Resolver(store, keys, metrics=Metrics()),
            metrics=metrics or self.metrics,
            audit=self.audit,  # type: ignore[arg-type]
        )

    async def put(self, name: str, value: bytes) -> str:
        result = await self.engine().writer.put(name, value)
        return result.version_id

    async def current(self, name: str) -> bytes:
        engine = self.engine()
        state = await self.store.read_stages(name)
        return (await engine.resolver.fetch(name, state.stages[CURRENT])).value.reveal()

    def sample(self, name: str, **labels: str) -> float:
        return self.metrics.registry.get_sample_value(name, labels) or 0.0


class ScriptedRotator:
    """A rotator whose steps fail on demand; records every call."""

    def __init__(self, value: bytes = b"new-value") -> None:
        self.value = value
        self.calls: list[tuple[str, str]] = []
        self.fail: dict[str, Exception] = {}
        self.seen: list[RotationContext] = []
        self.hook: Callable[[str], Any] | None = None

    async def _step(self, step: str, ctx: RotationContext) -> None:
        self.calls.append((step, ctx.token))
        self.seen.append(ctx)
        if self.hook is not None:
            await self.hook(step)
        exc = self.fail.get(step)
        if exc is not None:
            raise exc

    async def create(self, ctx: RotationContext) -> bytes:
        await self._step("create", ctx)
        return self.value

    async def set(self, ctx: RotationContext) -> None:
        await self._step("set", ctx)

    async def test(self, ctx: RotationContext) -> None:
        await self._step("test", ctx)

    async def aclose(self) -> None:
        return None


__all__ = ["BackendUnavailable", "RecordingAudit", "RotationFailed", "ScriptedRotator", "World"]
