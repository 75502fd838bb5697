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
BackendUnavailable and the refresher restarts the watch (with a new resync)
after a backoff step.

Client: aetcd 1.0 (asyncio over grpcio), checked against etcd 3.4 and
protobuf 7 (its generated code is protobuf 5; the runtime accepts it without
a warning). It speaks the v3 gRPC API natively: transactions, and one watch
stream with server-side compaction errors, without a gateway layer of our own
(the JSON gateway would need its own streaming-JSON parser for watches and
string-encoded int64s). :mod:`agent.stores.etcd_client` makes the channel
itself (aetcd dials plaintext only), with TLS when configured; endpoints are
tried in turn, reconnect backoff is capped at 1 s, keepalive pings find a dead
peer under a quiet watch, and an expired auth token is renewed once.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from datetime import datetime
from typing import Any, TypeVar

import aetcd
import aetcd.exceptions

from agent.bounded import DEFAULT_LIMITS, Limits
from agent.config import AgentConfig, EtcdStoreConfig, read_secret_ref
from agent.crypto.stageproof import PROOF_KEY
from agent.errors import (
    AgentError,
    BackendUnavailable,
    ConfigError,
    Conflict,
    SecretNotFound,
    VersionNotFound,
)
from agent.metrics import Metrics
from agent.stores.base import (
    StageState,
    StoredVersion,
    WatchEvent,
    check_stage_map,
    check_store_name,
)
from agent.stores.etcd_client import (
    _RPC_ERRORS,
    EtcdTls,
    _Client,
    _map_error,
    _outcome,
    _rpc_status,
    _split_endpoint,
    _stages,
    _unwrap,
    _wrap,
)
from agent.types import (
    utcnow,
    validate_version_id,
)

T = TypeVar("T")
_RESERVED = frozenset({"versions", "stages"})


def check_name(name: str) -> str:
    """A valid name that cannot collide with the layout's own path segments."""
    return check_store_name(name, store="etcd", reserved=_RESERVED)


class EtcdStore:
    """A WritableStore and WatchableStore on etcd v3."""

    def __init__(
        self,
        endpoints: str | Sequence[str] = "127.0.0.1:2379",
        *,
        prefix: str = "/secrets-agent",
        store_id: str = "default",
        username: str | None = None,
        password: str | None = None,
        tls: EtcdTls | None = None,
        timeout: float = 5.0,
        keepalive: float = 30.0,
        metrics: Metrics | None = None,
        limits: Limits = DEFAULT_LIMITS,
    ) -> None:
        self.limits = limits
        if (username is None) != (password is None):
            raise ConfigError("etcd username and password go together", path="store.username")
        targets = [
            _split_endpoint(e) for e in ([endpoints] if isinstance(endpoints, str) else endpoints)
        ]
        self.store_id = store_id
        self.prefix = prefix.rstrip("/")
        self.timeout = timeout
        self.metrics = metrics
        self._targets = itertools.cycle(
            [(host, port, tls or (EtcdTls() if https else None)) for host, port, https in targets]
        )
        self._auth = (username, password)
        self._options = {
            # gRPC backs off reconnecting for up to 2 minutes by default: after a long
            # outage that would delay noticing etcd is back far past our own backoff.
            "grpc.initial_reconnect_backoff_ms": 100,
            "grpc.min_reconnect_backoff_ms": 100,
            "grpc.max_reconnect_backoff_ms": 1000,
            # A peer that vanished without a reset leaves a quiet watch hanging: ping
            # it (etcd refuses pings more often than every 5 s by default), and bound
            # the wait for any ping's ack, which gRPC otherwise gives 60 s.
            "grpc.keepalive_time_ms": int(keepalive * 1000),
            "grpc.keepalive_timeout_ms": int(max(1.0, timeout) * 1000),
            "grpc.http2.ping_timeout_ms": int(max(1.0, timeout) * 1000),
        }
        self._client = self._new_client()
        self._connected = False
        self._lock = asyncio.Lock()
        self._closing: set[asyncio.Future[None]] = set()

    def _new_client(self) -> _Client:
        host, port, tls = next(self._targets)
        return _Client(
            host=host,
            port=port,
            username=self._auth[0],
            password=self._auth[1],
            timeout=max(1, round(self.timeout)),
            options=self._options,
            tls=tls,
        )

    def _reset(self) -> None:
        """Start over on a fresh channel (to the next endpoint) after a connection failure."""
        old, self._client, self._connected = self._client, self._new_client(), False
        task = asyncio.ensure_future(_close_quietly(old))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    @classmethod
    def from_config(
        cls, cfg: EtcdStoreConfig, *, config: AgentConfig, metrics: Metrics
    ) -> EtcdStore:
        password = (
            read_secret_ref(cfg.password, base_dir=config.base_dir).decode()
            if cfg.password
            else None
        )
        tls = None if cfg.tls is None else EtcdTls.read(cfg.tls.ca, cfg.tls.cert, cfg.tls.key)
        return cls(
            cfg.endpoints,
            prefix=cfg.prefix,
            store_id=cfg.id,
            username=cfg.username,
            password=password,
            tls=tls,
            timeout=cfg.timeout,
            metrics=metrics,
            limits=cfg.limits,
        )

    # ------------------------------------------------------------------ plumbing

    def _key(self, name: str, *parts: str) -> bytes:
        return "/".join((self.prefix, name, *parts)).encode()

    async def _connect(self) -> None:
        if not self._connected:
            async with self._lock:
                if not self._connected:
                    async with asyncio.timeout(self.timeout):
                        await self._client.connect()
                    self._connected = True

    async def _call(self, operation: str, fn: Callable[[], Awaitable[T]]) -> T:
        """Run one etcd operation with a timeout; map and count its outcome."""
        for attempt in (1, 2):
            try:
                await self._connect()
                # asyncio.timeout, not wait_for: on 3.11 wait_for swallows a
                # cancel that lands as the call completes (cpython gh-86296),
                # and a cancelled scheduler or refresher then ran on for ever.
                async with asyncio.timeout(self.timeout):
                    result = await fn()
            except AgentError as exc:
                self._count(operation, exc)
                raise
            except _RPC_ERRORS as exc:
                err = _map_error(exc, operation)
                if attempt == 1 and "invalid auth token" in _rpc_status(exc)[1]:
                    self._reset()  # the token expired: authenticate again, once
                    continue
                if isinstance(err, BackendUnavailable):
                    self._reset()
                self._count(operation, err)
                raise err from None
            self._count(operation, "ok")
            return result
        raise AssertionError("unreachable")  # pragma: no cover

    def _count(self, operation: str, outcome: str | AgentError) -> None:
        if self.metrics is None:
            return
        if isinstance(outcome, AgentError):
            outcome = _outcome(outcome)
        self.metrics.store_operations.labels(operation, outcome).inc()

    # ------------------------------------------------------------------ reads

    async def list_names(self) -> list[str]:
        async def go() -> list[str]:
            rows = await self._client.get_prefix(f"{self.prefix}/".encode(), keys_only=True)
            names = {self._name_of(kv.key.decode()) for kv in rows}
            return sorted(n for n in names if n is not None)

        return await self._call("list_names", go)

    async def read_stages(self, name: str) -> StageState:
        check_name(name)

        async def go() -> StageState:
            got = await self._client.get(self._key(name, "stages"))
            if got is not None:
                stages = _stages(got.value, name, self.limits)
                proof = stages.pop(PROOF_KEY, None)
                return StageState(stages, str(got.mod_revision), proof)
            versions, _ = await self._client.count(self._key(name, "versions", ""))
            if not versions:
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
            created, envelope = _unwrap(got.value, name, version_id, self.limits)
            return StoredVersion(name, version_id, envelope, created)

        return await self._call("read_version", go)

    async def _exists_or_raise(self, name: str) -> None:
        keys, _ = await self._client.count(self._key(name, ""))
        if not keys:
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
                out.append((vid, _unwrap(kv.value, name, vid, self.limits)[0]))
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
            created, current = _unwrap(got.value, name, version_id, self.limits)
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
        self,
        name: str,
        stages: Mapping[str, str],
        *,
        expected_revision: str,
        proof: str | None = None,
    ) -> StageState:
        check_name(name)
        stages = check_stage_map(stages)
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
        doc = {**stages, PROOF_KEY: proof} if proof is not None else dict(stages)
        body = json.dumps(dict(sorted(doc.items())), separators=(",", ":")).encode()

        async def go() -> StageState:
            if not stages:
                await self._exists_or_raise(name)
            ok, responses = await self._client.transaction(
                compare=compare, success=[tx.put(key, body)], failure=[]
            )
            if not ok:
                await self._explain_failed_move(name, stages, expected_revision)
            revision = responses[0].response_put.header.revision
            return StageState(dict(stages), str(revision), proof)

        return await self._call("set_stages", go)

    async def delete_version(self, name: str, version_id: str) -> None:
        """Delete one unstaged version in a transaction guarded by the stage map's revision."""
        check_name(name)
        validate_version_id(version_id)
        key = self._key(name, "versions", version_id)
        stages_key = self._key(name, "stages")
        tx = self._client.transactions

        async def go() -> None:
            got = await self._client.get(stages_key)
            staged = _stages(got.value, name, self.limits) if got is not None else {}
            if version_id in staged.values():
                raise Conflict(f"version {version_id!r} of secret {name!r} is staged; not deleted")
            guard = (
                tx.version(stages_key) == 0
                if got is None
                else tx.mod(stages_key) == got.mod_revision
            )
            ok, _ = await self._client.transaction(
                compare=[guard, tx.version(key) > 0], success=[tx.delete(key)], failure=[]
            )
            if ok:
                return
            if await self._client.get(key) is None:
                await self._exists_or_raise(name)
                raise VersionNotFound(f"secret {name!r} has no version {version_id!r}")
            raise Conflict(f"stage map of secret {name!r} changed concurrently; not deleted")

        await self._call("delete_version", go)

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
        prefix = f"{self.prefix}/".encode()

        async def start() -> Any:
            _, revision = await self._client.count(prefix)
            return await self._client.watch_prefix(prefix, start_revision=revision + 1)

        stream = await self._call("watch", start)
        yield WatchEvent(None)
        try:
            async for event in stream:
                name = self._name_of(event.kv.key.decode())
                if name is not None:
                    yield WatchEvent(frozenset({name}))
        except _RPC_ERRORS as exc:
            self._count("watch", "unavailable")
            raise BackendUnavailable(
                f"etcd watch broke: {_map_error(exc, 'watch').message}"
            ) from None
        finally:
            with contextlib.suppress(Exception):
                await stream.cancel()
        raise BackendUnavailable("etcd watch ended (connection closed)")

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
