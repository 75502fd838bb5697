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

import contextlib
import json
from collections.abc import AsyncIterator, Mapping, Sequence
from datetime import datetime
from typing import Any

from agent.bounded import DEFAULT_LIMITS, Limits
from agent.config import AgentConfig, EtcdStoreConfig, read_secret_ref
from agent.crypto.stageproof import PROOF_KEY
from agent.errors import (
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
    name_checker,
)
from agent.stores.etcd_client import (
    _RPC_ERRORS,
    EtcdConnection,
    EtcdTls,
    _Client,
    _map_error,
    _split_endpoint,
    _stages,
    _unwrap,
    _wrap,
)
from agent.types import utcnow, validate_version_id

check_name = name_checker("etcd", frozenset({"versions", "stages"}))


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
        self._conn = EtcdConnection(
            [(host, port, tls or (EtcdTls() if https else None)) for host, port, https in targets],
            username=username,
            password=password,
            timeout=timeout,
            keepalive=keepalive,
            metrics=metrics,
        )

    @property
    def _client(self) -> _Client:
        """The current client (a new one after a connection failure)."""
        return self._conn.client

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

    # ------------------------------------------------------------------ reads

    async def list_names(self) -> list[str]:
        async def go() -> list[str]:
            rows = await self._client.get_prefix(f"{self.prefix}/".encode(), keys_only=True)
            names = {self._name_of(kv.key.decode()) for kv in rows}
            return sorted(n for n in names if n is not None)

        return await self._conn.call("list_names", go)

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

        return await self._conn.call("read_stages", go)

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

        return await self._conn.call("read_version", go)

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

        return await self._conn.call("list_versions", go)

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

        await self._conn.call("write_version", go)

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

        await self._conn.call("replace_envelope", go)

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

        return await self._conn.call("set_stages", go)

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

        await self._conn.call("delete_version", go)

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

        stream = await self._conn.call("watch", start)
        yield WatchEvent(None)
        try:
            async for event in stream:
                name = self._name_of(event.kv.key.decode())
                if name is not None:
                    yield WatchEvent(frozenset({name}))
        except _RPC_ERRORS as exc:
            self._conn.count("watch", "unavailable")
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
        await self._conn.aclose()
