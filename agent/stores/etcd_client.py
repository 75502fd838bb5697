"""The etcd store's connection (TLS, endpoints, auth, timeouts, reconnects) and error
mapping, and its value encoding (see :mod:`agent.stores.etcd`).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import itertools
import json
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

import aetcd
import aetcd.exceptions
import grpc
from aetcd import rpc, watcher
from aetcd.utils import prefix_range_end

from agent.bounded import Limits, loads_json
from agent.errors import (
    AccessDenied,
    AgentError,
    BackendUnavailable,
    BadRequest,
    ConfigError,
    DecryptionError,
    MalformedStoreData,
)
from agent.fsowner import denied_suffix
from agent.metrics import Metrics
from agent.stores.base import store_outcome

T = TypeVar("T")

_AUTH_FAILED = ("authentication failed", "user name is empty", "invalid auth token")
_RPC_ERRORS = (aetcd.exceptions.ClientError, grpc.aio.AioRpcError, TimeoutError, OSError)


@dataclass(frozen=True)
class EtcdTls:
    """PEM material for TLS to etcd: ``ca`` None means the system roots; no cert, no client auth."""

    ca: bytes | None = None
    cert: bytes | None = None
    key: bytes | None = field(default=None, repr=False)

    @classmethod
    def read(cls, ca: Path | None, cert: Path | None, key: Path | None) -> EtcdTls:
        """Read the PEM files named in ``store.tls``."""
        if (cert is None) != (key is None):
            raise ConfigError("a client certificate needs its key", path="store.tls")
        try:
            return cls(*(p.read_bytes() if p else None for p in (ca, cert, key)))
        except OSError as exc:
            raise ConfigError(
                f"cannot read {exc.filename}: {exc.strerror}{denied_suffix(exc)}", path="store.tls"
            ) from None

    def credentials(self) -> Any:
        return grpc.ssl_channel_credentials(
            root_certificates=self.ca, private_key=self.key, certificate_chain=self.cert
        )


class _Client(aetcd.Client):  # type: ignore[misc]
    """aetcd's client on a channel made here, so it can be TLS.

    ``connect`` does what aetcd 1.0's does (authenticate, stubs, watcher);
    the store serialises calls to it, so aetcd's own connect guard is not needed.
    """

    def __init__(self, *, tls: EtcdTls | None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._tls = tls

    async def connect(self) -> None:
        if self._connected.is_set():
            return
        target, options = f"{self._host}:{self._port}", list(self._options.items())
        if self._tls is None:
            self.channel = rpc.insecure_channel(target, options=options)
        else:
            self.channel = rpc.secure_channel(target, self._tls.credentials(), options=options)
        if self._username is not None:
            self.auth_stub = rpc.AuthStub(self.channel)
            request = rpc.AuthenticateRequest(name=self._username, password=self._password)
            try:
                resp = await self.auth_stub.Authenticate(request, timeout=self._timeout)
            except BaseException:
                await self.channel.close()  # no channel left behind by a failed login
                self._init_channel_attrs()
                raise
            self.metadata = (("token", resp.token),)
        self.kvstub = rpc.KVStub(self.channel)
        self.clusterstub = rpc.ClusterStub(self.channel)
        self.leasestub = rpc.LeaseStub(self.channel)
        self.maintenancestub = rpc.MaintenanceStub(self.channel)
        self._watcher = watcher.Watcher(
            rpc.WatchStub(self.channel), timeout=self._timeout, metadata=self.metadata
        )
        self._connected.set()

    async def count(self, prefix: bytes) -> tuple[int, int]:
        """(keys under ``prefix``, store revision), sending no keys or values."""
        request = rpc.RangeRequest(key=prefix, range_end=prefix_range_end(prefix), count_only=True)
        resp = await self.kvstub.Range(request, timeout=self._timeout, metadata=self.metadata)
        return int(resp.count), int(resp.header.revision)


class EtcdConnection:
    """The store's client: endpoints tried in turn, one lazy connect, a timeout per call.

    After a connection failure the next call starts over on a fresh channel to
    the next endpoint; an expired auth token is renewed once. Every call's
    outcome is counted in ``secrets_agent_store_operations_total``.
    """

    def __init__(
        self,
        targets: Sequence[tuple[str, int, EtcdTls | None]],
        *,
        username: str | None,
        password: str | None,
        timeout: float,
        keepalive: float,
        metrics: Metrics | None,
    ) -> None:
        self.timeout = timeout
        self.metrics = metrics
        self._targets = itertools.cycle(targets)
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
        self.client = self._new_client()
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
        old, self.client, self._connected = self.client, self._new_client(), False
        task = asyncio.ensure_future(_close_quietly(old))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def _connect(self) -> None:
        if not self._connected:
            async with self._lock:
                if not self._connected:
                    async with asyncio.timeout(self.timeout):
                        await self.client.connect()
                    self._connected = True

    async def call(self, operation: str, fn: Callable[[], Awaitable[T]]) -> T:
        """Run one etcd operation (``fn`` uses :attr:`client`) with a timeout; map and
        count its outcome."""
        for attempt in (1, 2):
            try:
                await self._connect()
                # asyncio.timeout, not wait_for: on 3.11 wait_for swallows a
                # cancel that lands as the call completes (cpython gh-86296),
                # and a cancelled scheduler or refresher then ran on for ever.
                async with asyncio.timeout(self.timeout):
                    result = await fn()
            except AgentError as exc:
                self.count(operation, exc)
                raise
            except _RPC_ERRORS as exc:
                err = _map_error(exc, operation)
                if attempt == 1 and "invalid auth token" in _rpc_status(exc)[1]:
                    self._reset()  # the token expired: authenticate again, once
                    continue
                if isinstance(err, BackendUnavailable):
                    self._reset()
                self.count(operation, err)
                raise err from None
            self.count(operation, "ok")
            return result
        raise AssertionError("unreachable")  # pragma: no cover

    def count(self, operation: str, outcome: str | AgentError) -> None:
        if self.metrics is None:
            return
        if isinstance(outcome, AgentError):
            outcome = store_outcome(outcome)
        self.metrics.store_operations.labels(operation, outcome).inc()

    async def aclose(self) -> None:
        """Close the channel and any left closing after a reset."""
        if self._connected:
            await _close_quietly(self.client)
            self._connected = False
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)


async def _close_quietly(client: aetcd.Client) -> None:
    with contextlib.suppress(Exception):
        await client.close()


def _rpc_status(exc: BaseException) -> tuple[Any, str]:
    """The gRPC status code and details behind an aetcd or grpc error, else (None, its text)."""
    for err in (exc, exc.__cause__):
        if isinstance(err, grpc.aio.AioRpcError):
            return err.code(), str(err.details() or "")
    return None, str(exc)


def _map_error(exc: BaseException, operation: str) -> AgentError:
    """Our error for an etcd failure: denied and bad requests are permanent, the rest transient."""
    code, details = _rpc_status(exc)
    if code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED) or (
        code == grpc.StatusCode.INVALID_ARGUMENT and any(s in details for s in _AUTH_FAILED)
    ):
        return AccessDenied(f"etcd denied {operation} ({details or code.name})")
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return BadRequest(f"etcd refused {operation} ({details})")
    reason = code.name if code is not None else type(exc).__name__
    return BackendUnavailable(f"etcd unavailable during {operation}: {reason}")


def _split_endpoint(endpoint: str) -> tuple[str, int, bool]:
    """``[scheme://]host[:port]`` as (host, port, https)."""
    scheme, sep, rest = endpoint.partition("://")
    if not sep:
        scheme, rest = "http", endpoint
    host, colon, port = rest.rstrip("/").rpartition(":")
    if not colon or not port.isdigit() or host.endswith(":"):
        host, port = rest.rstrip("/"), "2379"
    return host, int(port), scheme == "https"


def _wrap(envelope: bytes, created: datetime) -> bytes:
    return json.dumps(
        {"created_at": created.isoformat(), "envelope": base64.b64encode(envelope).decode()}
    ).encode()


def _unwrap(value: bytes, name: str, vid: str, limits: Limits) -> tuple[datetime, bytes]:
    what = f"version {vid!r} of {name!r} in etcd"
    # The record holds the envelope in base64 (4/3 of its size) plus a timestamp.
    wrapped = Limits(limits.max_object_size * 4 // 3 + 256, limits.max_json_depth)
    doc: Any = loads_json(value, what=what, error=DecryptionError, limits=wrapped)
    try:
        return (
            datetime.fromisoformat(doc["created_at"]),
            base64.b64decode(doc["envelope"], validate=True),
        )
    except (ValueError, KeyError, TypeError, binascii.Error):
        raise DecryptionError(f"{what} is malformed") from None


def _stages(value: bytes, name: str, limits: Limits) -> dict[str, str]:
    what = f"stage map of {name!r} in etcd"
    doc = loads_json(value, what=what, error=MalformedStoreData, limits=limits)
    if not isinstance(doc, dict) or not all(isinstance(v, str) for v in doc.values()):
        raise MalformedStoreData(f"{what} is not a JSON object of stage -> version id")
    return {str(k): v for k, v in doc.items()}
