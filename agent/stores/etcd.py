"""The etcd store: a fleet of agents reading one etcd cluster, pushed by watch.

Layout (the key prefix is ``store.prefix``, default ``/secrets-agent``)::

    <prefix>/<name>/versions/<id>   {"created_at": "<ISO time>", "envelope": "<base64>"}
    <prefix>/<name>/stages          {"CURRENT": "<id>", "PREVIOUS": "<id>"}

etcd keeps no timestamps, so a version's value wraps the envelope with its
creation time. The stage map's ``mod_revision`` is the cheap version check. A
stage move is one transaction that compares that revision (and that every
referenced version exists), so two writers racing to promote cannot both win.
A watch on the prefix pushes changes; every (re)started watch first yields a
resync, and it starts from the revision that resync read, so nothing is lost
between them. A compacted start revision or a broken stream raises
BackendUnavailable and the refresher restarts the watch with backoff.

Client: aetcd (asyncio, gRPC). It is maintained, speaks the v3 API natively,
and gives transactions and watches without a JSON-gateway layer of our own.
It has no TLS support, so ``store.tls`` is refused at start with a clear error.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from datetime import datetime
from typing import Any, TypeVar

import aetcd
import aetcd.exceptions

from agent.config import AgentConfig, EtcdStoreConfig, read_secret_ref
from agent.errors import (
    AccessDenied,
    AgentError,
    BackendUnavailable,
    BadRequest,
    ConfigError,
    Conflict,
    InvalidName,
    SecretNotFound,
    VersionNotFound,
)
from agent.metrics import Metrics
from agent.stores.base import StageState, StoredVersion, WatchEvent
from agent.types import (
    STAGE_ALIASES,
    normalize_stage,
    utcnow,
    validate_name,
    validate_version_id,
)

T = TypeVar("T")
_RESERVED = frozenset({"versions", "stages"})


def check_name(name: str) -> str:
    """A valid name that cannot collide with the layout's own path segments."""
    validate_name(name)
    if _RESERVED & set(name.split("/")):
        raise InvalidName(
            "invalid secret name for the etcd store: a path segment "
            "'versions' or 'stages' collides with the store layout"
        )
    return name


class EtcdStore:
    """A WritableStore and WatchableStore on etcd v3."""

    def __init__(
        self,
        endpoint: str = "127.0.0.1:2379",
        *,
        prefix: str = "/secrets-agent",
        store_id: str = "default",
        username: str | None = None,
        password: str | None = None,
        timeout: float = 5.0,
        metrics: Metrics | None = None,
    ) -> None:
        host, _, port = endpoint.rpartition(":")
        self.store_id = store_id
        self.prefix = prefix.rstrip("/")
        self.timeout = timeout
        self.metrics = metrics
        self._target = (host or "127.0.0.1", int(port or 2379), username, password)
        self._client = self._new_client()
        self._connected = False
        self._lock = asyncio.Lock()
        self._closing: set[asyncio.Future[None]] = set()

    def _new_client(self) -> aetcd.Client:
        host, port, username, password = self._target
        # gRPC backs off reconnecting for up to 2 minutes by default: after a long
        # outage that would delay noticing etcd is back far past our own backoff.
        return aetcd.Client(
            host=host,
            port=port,
            username=username,
            password=password,
            timeout=max(1, round(self.timeout)),
            options={
                "grpc.initial_reconnect_backoff_ms": 100,
                "grpc.min_reconnect_backoff_ms": 100,
                "grpc.max_reconnect_backoff_ms": 1000,
            },
        )

    def _reset(self) -> None:
        """Start over with a fresh channel after a connection failure."""
        old, self._client, self._connected = self._client, self._new_client(), False
        task = asyncio.ensure_future(_close_quietly(old))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    @classmethod
    def from_config(
        cls, cfg: EtcdStoreConfig, *, config: AgentConfig, metrics: Metrics
    ) -> EtcdStore:
        if cfg.tls is not None:
            raise ConfigError(
                "TLS to etcd is not supported yet (the aetcd client has no TLS); "
                "reach etcd over loopback or a local TLS proxy",
                path="store.tls",
            )
        password = (
            read_secret_ref(cfg.password, base_dir=config.base_dir).decode()
            if cfg.password
            else None
        )
        return cls(
            cfg.endpoints[0],
            prefix=cfg.prefix,
            store_id=cfg.id,
            username=cfg.username,
            password=password,
            timeout=cfg.timeout,
            metrics=metrics,
        )

    # ------------------------------------------------------------------ plumbing

    def _key(self, name: str, *parts: str) -> bytes:
        return "/".join((self.prefix, name, *parts)).encode()

    async def _call(self, operation: str, fn: Callable[[], Awaitable[T]]) -> T:
        try:
            if not self._connected:
                async with self._lock:
                    if not self._connected:
                        await asyncio.wait_for(self._client.connect(), self.timeout)
                        self._connected = True
            result = await asyncio.wait_for(fn(), self.timeout)
        except AgentError as exc:
            self._count(operation, exc)
            raise
        except aetcd.exceptions.UnauthenticatedError:
            self._count(operation, "denied")
            raise AccessDenied(f"etcd refused our credentials ({operation})") from None
        except (aetcd.exceptions.ClientError, TimeoutError, OSError) as exc:
            self._count(operation, "unavailable")
            if isinstance(
                exc,
                (
                    aetcd.exceptions.ConnectionFailedError,
                    aetcd.exceptions.ConnectionTimeoutError,
                    TimeoutError,
                ),
            ):
                self._reset()
            raise BackendUnavailable(
                f"etcd unavailable during {operation}: {type(exc).__name__}"
            ) from None
        self._count(operation, "ok")
        return result

    def _count(self, operation: str, outcome: str | AgentError) -> None:
        if self.metrics is None:
            return
        if isinstance(outcome, AgentError):
            outcome = {"conflict": "conflict"}.get(
                outcome.code, "not_found" if outcome.status == 404 else "error"
            )
        self.metrics.store_operations.labels(operation, outcome).inc()

    # ------------------------------------------------------------------ reads

    async def list_names(self) -> list[str]:
        async def go() -> list[str]:
            rows = await self._client.get_prefix(f"{self.prefix}/".encode(), keys_only=True)
            names = set()
            for kv in rows:
                rest = kv.key.decode()[len(self.prefix) + 1 :]
                if rest.endswith("/stages"):
                    names.add(rest[: -len("/stages")])
                elif "/versions/" in rest:
                    names.add(rest.rsplit("/versions/", 1)[0])
            return sorted(names)

        return await self._call("list_names", go)

    async def read_stages(self, name: str) -> StageState:
        check_name(name)

        async def go() -> StageState:
            got = await self._client.get(self._key(name, "stages"))
            if got is not None:
                return StageState(_stages(got.value, name), str(got.mod_revision))
            any_version = await self._client.get_prefix(
                self._key(name, "versions", ""), keys_only=True
            )
            if not list(any_version):
                raise SecretNotFound(f"secret {name!r} does not exist")
            return StageState({}, "")

        return await self._call("read_stages", go)

    async def read_version(self, name: str, version_id: str) -> StoredVersion:
        check_name(name)
        validate_version_id(version_id)

        async def go() -> StoredVersion:
            got = await self._client.get(self._key(name, "versions", version_id))
            if got is None:
                await self._exists_or_raise(name)
                raise VersionNotFound(f"secret {name!r} has no version {version_id!r}")
            created, envelope = _unwrap(got.value, name, version_id)
            return StoredVersion(name, version_id, envelope, created)

        return await self._call("read_version", go)

    async def _exists_or_raise(self, name: str) -> None:
        rows = await self._client.get_prefix(self._key(name, ""), keys_only=True)
        if not list(rows):
            raise SecretNotFound(f"secret {name!r} does not exist")

    async def list_versions(self, name: str) -> list[tuple[str, datetime]]:
        check_name(name)

        async def go() -> list[tuple[str, datetime]]:
            rows = list(await self._client.get_prefix(self._key(name, "versions", "")))
            if not rows:
                await self._exists_or_raise(name)
            out = []
            for kv in rows:
                vid = kv.key.decode().rsplit("/", 1)[1]
                out.append((vid, _unwrap(kv.value, name, vid)[0]))
            return sorted(out, key=lambda item: (item[1], item[0]))

        return await self._call("list_versions", go)

    # ----------------------------------------------------------------- writes

    async def write_version(self, name: str, version_id: str, envelope: bytes) -> None:
        check_name(name)
        validate_version_id(version_id)
        key = self._key(name, "versions", version_id)
        value = _wrap(envelope, utcnow())
        tx = self._client.transactions

        async def go() -> None:
            ok, _ = await self._client.transaction(
                compare=[tx.version(key) == 0], success=[tx.put(key, value)], failure=[]
            )
            if not ok:
                raise Conflict(f"secret {name!r} already has a version {version_id!r}")

        await self._call("write_version", go)

    async def replace_envelope(
        self, name: str, version_id: str, envelope: bytes, *, expected: bytes
    ) -> None:
        check_name(name)
        validate_version_id(version_id)
        key = self._key(name, "versions", version_id)
        tx = self._client.transactions

        async def go() -> None:
            got = await self._client.get(key)
            if got is None:
                await self._exists_or_raise(name)
                raise VersionNotFound(f"secret {name!r} has no version {version_id!r}")
            created, current = _unwrap(got.value, name, version_id)
            if current != expected:
                raise Conflict(f"version {version_id!r} of {name!r} changed concurrently")
            ok, _ = await self._client.transaction(
                compare=[tx.mod(key) == got.mod_revision],
                success=[tx.put(key, _wrap(envelope, created))],
                failure=[],
            )
            if not ok:
                raise Conflict(f"version {version_id!r} of {name!r} changed concurrently")

        await self._call("replace_envelope", go)

    async def set_stages(
        self, name: str, stages: Mapping[str, str], *, expected_revision: str
    ) -> StageState:
        check_name(name)
        for stage, vid in stages.items():
            if stage in STAGE_ALIASES or normalize_stage(stage) != stage:
                raise BadRequest(f"stage labels are stored normalised, got {stage!r}")
            validate_version_id(vid)
        key = self._key(name, "stages")
        tx = self._client.transactions
        version_keys = {self._key(name, "versions", vid) for vid in stages.values()}
        if expected_revision == "":
            guard = tx.version(key) == 0
        elif expected_revision.isdigit():
            guard = tx.mod(key) == int(expected_revision)
        else:  # not a revision this store ever gave out: it cannot match
            raise Conflict(
                f"stage map of secret {name!r} changed concurrently (expected "
                f"revision {expected_revision!r} is not an etcd revision)"
            )
        compare = [guard, *(tx.version(vk) > 0 for vk in sorted(version_keys))]
        body = json.dumps(dict(sorted(stages.items())), separators=(",", ":")).encode()

        async def go() -> StageState:
            if not stages:
                await self._exists_or_raise(name)
            ok, responses = await self._client.transaction(
                compare=compare, success=[tx.put(key, body)], failure=[]
            )
            if not ok:
                await self._explain_failed_move(name, stages, expected_revision)
            revision = responses[0].response_put.header.revision
            return StageState(dict(stages), str(revision))

        return await self._call("set_stages", go)

    async def _explain_failed_move(
        self, name: str, stages: Mapping[str, str], expected: str
    ) -> None:
        for vid in set(stages.values()):
            if await self._client.get(self._key(name, "versions", vid)) is None:
                raise VersionNotFound(f"secret {name!r} has no version {vid!r}")
        got = await self._client.get(self._key(name, "stages"))
        found = str(got.mod_revision) if got is not None else ""
        raise Conflict(
            f"stage map of secret {name!r} changed concurrently (expected revision "
            f"{expected or 'none'}, found {found or 'none'}); nothing was written"
        )

    # ------------------------------------------------------------------ watch

    async def watch(self) -> AsyncIterator[WatchEvent]:
        """Resync, then push the names under the prefix that change."""
        start = await self._call("watch", self._current_revision)
        try:
            stream = await self._client.watch_prefix(
                f"{self.prefix}/".encode(), start_revision=start + 1
            )
        except (aetcd.exceptions.ClientError, OSError) as exc:
            raise BackendUnavailable(f"etcd watch failed: {type(exc).__name__}") from None
        yield WatchEvent(None)
        try:
            async for event in stream:
                name = self._name_of(event.kv.key.decode())
                if name is not None:
                    yield WatchEvent(frozenset({name}))
        except (aetcd.exceptions.ClientError, OSError) as exc:
            raise BackendUnavailable(f"etcd watch broke: {type(exc).__name__}") from None
        finally:
            with contextlib.suppress(Exception):
                await stream.cancel()
        raise BackendUnavailable("etcd watch ended")

    async def _current_revision(self) -> int:
        rows = await self._client.get_prefix(f"{self.prefix}/".encode(), keys_only=True)
        return int(rows.header.revision)

    def _name_of(self, key: str) -> str | None:
        rest = key[len(self.prefix) + 1 :]
        if rest.endswith("/stages"):
            return rest[: -len("/stages")]
        if "/versions/" in rest:
            return rest.rsplit("/versions/", 1)[0]
        return None

    async def aclose(self) -> None:
        if self._connected:
            await _close_quietly(self._client)
            self._connected = False
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)


async def _close_quietly(client: aetcd.Client) -> None:
    with contextlib.suppress(Exception):
        await client.close()


def _wrap(envelope: bytes, created: datetime) -> bytes:
    return json.dumps(
        {"created_at": created.isoformat(), "envelope": base64.b64encode(envelope).decode()}
    ).encode()


def _unwrap(value: bytes, name: str, vid: str) -> tuple[datetime, bytes]:
    try:
        doc: Any = json.loads(value)
        return (
            datetime.fromisoformat(doc["created_at"]),
            base64.b64decode(doc["envelope"], validate=True),
        )
    except (ValueError, KeyError, TypeError, binascii.Error):
        raise BackendUnavailable(f"version {vid!r} of {name!r} is malformed in etcd") from None


def _stages(value: bytes, name: str) -> dict[str, str]:
    try:
        doc = json.loads(value)
    except ValueError:
        raise BackendUnavailable(f"stage map of {name!r} is malformed in etcd") from None
    if not isinstance(doc, dict) or not all(isinstance(v, str) for v in doc.values()):
        raise BackendUnavailable(f"stage map of {name!r} is malformed in etcd")
    return {str(k): v for k, v in doc.items()}
