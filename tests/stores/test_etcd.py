"""The etcd store against real etcd 3.4 servers: races, watch, outages, TLS, auth.

The shared contract suite (test_contract.py) covers the store API; these tests
cover what only etcd has: one-transaction stage moves under racing writers,
the watch across an outage and a compaction, TLS, users and roles.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime
import ipaddress
import json
import os
import shutil
import signal
import ssl
import urllib.request
import uuid
from collections.abc import AsyncIterator, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from agent.config import load_config
from agent.core import Core
from agent.errors import AccessDenied, BackendUnavailable, ConfigError, Conflict
from agent.metrics import Metrics
from agent.stores.base import StageState, WatchEvent
from agent.stores.etcd import EtcdStore, EtcdTls
from agent.writer import SecretWriter
from tests.agentenv import AgentEnv
from tests.servers import EtcdServer, free_port, require

pytestmark = pytest.mark.integration

BOUND = 15.0  # seconds: a liveness bound for waits, not a latency target


def _prefix() -> str:
    return f"/t-{uuid.uuid4().hex[:10]}"


async def _next(events: AsyncIterator[WatchEvent], timeout: float = BOUND) -> WatchEvent:
    async with asyncio.timeout(timeout):
        return await anext(events)


async def _until_named(events: AsyncIterator[WatchEvent], name: str) -> None:
    async with asyncio.timeout(BOUND):
        async for event in events:
            if event.names is not None and name in event.names:
                return


def _gateway(server: EtcdServer, path: str, body: Mapping[str, Any], **headers: str) -> Any:
    """POST to etcd's JSON gateway (what etcdctl would do; etcdctl is not installed)."""
    req = urllib.request.Request(
        f"{server.client_url}/v3/{path}", data=json.dumps(body).encode(), method="POST"
    )
    for key, value in headers.items():
        req.add_header(key, value)
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.loads(resp.read())


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def _sample(core: Core, metric: str, **labels: str) -> float:
    return core.metrics.registry.get_sample_value(metric, labels) or 0.0


# --------------------------------------------------------------------------- racing writers


class _GatedStore:
    """An EtcdStore whose first ``read_stages`` waits until both writers have read.

    So both writers decide from the same revision, as in a real race, every time.
    """

    def __init__(self, inner: EtcdStore, barrier: asyncio.Barrier) -> None:
        self._inner = inner
        self._barrier = barrier
        self.store_id = inner.store_id

    def __getattr__(self, attr: str) -> Any:
        return getattr(self._inner, attr)

    async def read_stages(self, name: str) -> StageState:
        state = await self._inner.read_stages(name)
        await self._barrier.wait()
        return state


async def test_racing_writers_promoting_different_versions_leave_one_current_and_one_previous(
    env: AgentEnv, etcd_server: EtcdServer
) -> None:
    """20 rounds through the writer code path: one promotion wins, the other gets Conflict."""
    env.configure(store={"type": "etcd", "endpoints": [etcd_server.endpoint], "prefix": _prefix()})
    config = env.config()
    cores = [Core.build(config), Core.build(config)]
    try:
        for round_ in range(20):
            name = f"race/{round_}"
            base = await cores[0].writer().put(name, b"base")
            a = await cores[0].writer().put(name, b"a", stage="PENDING")
            b = await cores[1].writer().put(name, b"b", stage="CANDIDATE")
            barrier = asyncio.Barrier(2)
            writers = [
                SecretWriter(_GatedStore(c.store, barrier), c.datakeys)  # type: ignore[arg-type]
                for c in cores
            ]
            results = await asyncio.gather(
                writers[0].promote(name, "CURRENT", a.version_id),
                writers[1].promote(name, "CURRENT", b.version_id),
                return_exceptions=True,
            )
            won = [i for i, r in enumerate(results) if isinstance(r, StageState)]
            lost = [r for r in results if isinstance(r, Conflict)]
            assert len(won) == 1 and len(lost) == 1, results
            assert "changed concurrently" in lost[0].message
            stages = (await cores[0].store.read_stages(name)).stages
            winner, loser = (a, b) if won[0] == 0 else (b, a)
            assert stages["CURRENT"] == winner.version_id
            assert stages["PREVIOUS"] == base.version_id
            assert loser.version_id not in (stages["CURRENT"], stages["PREVIOUS"])
    finally:
        for core in cores:
            await core.aclose()


# --------------------------------------------------------------------------- watch


@contextlib.asynccontextmanager
async def _store(endpoint: str | list[str], **kw: Any) -> AsyncIterator[EtcdStore]:
    store = EtcdStore(endpoint, prefix=kw.pop("prefix", _prefix()), **kw)
    try:
        yield store
    finally:
        await store.aclose()


async def test_a_change_pushes_an_event_naming_the_secret(etcd_server: EtcdServer) -> None:
    prefix = _prefix()
    async with (
        _store(etcd_server.endpoint, prefix=prefix) as watcher,
        _store(etcd_server.endpoint, prefix=prefix) as writer,
    ):
        events = watcher.watch()
        assert await _next(events) == WatchEvent(None)
        await writer.write_version("app/db", "v1", b"env")
        assert await _next(events) == WatchEvent(frozenset({"app/db"}))
        await writer.set_stages("app/db", {"CURRENT": "v1"}, expected_revision="")
        assert await _next(events) == WatchEvent(frozenset({"app/db"}))
        await events.aclose()  # type: ignore[attr-defined]


async def test_a_watch_raises_backend_unavailable_when_etcd_stops_and_restarts_with_a_resync(
    etcd_server: EtcdServer,
) -> None:
    metrics = Metrics()
    async with _store(etcd_server.endpoint, timeout=2.0, metrics=metrics) as store:
        await store.write_version("app", "v1", b"env")
        events = store.watch()
        assert await _next(events) == WatchEvent(None)
        etcd_server.stop()
        try:
            with pytest.raises(BackendUnavailable):
                await _next(events)
            with pytest.raises(BackendUnavailable):  # and a new watch fails, not hangs
                await _next(store.watch())
            with pytest.raises(BackendUnavailable):
                await store.read_stages("app")
        finally:
            etcd_server.start()
        async with asyncio.timeout(BOUND):
            while True:  # the refresher's backoff loop, in short
                try:
                    events = store.watch()
                    first = await anext(events)
                    break
                except BackendUnavailable:
                    await asyncio.sleep(0.1)
        assert first == WatchEvent(None)
        await store.set_stages("app", {"CURRENT": "v1"}, expected_revision="")
        assert await _next(events) == WatchEvent(frozenset({"app"}))
        await events.aclose()  # type: ignore[attr-defined]
    unavailable = metrics.registry.get_sample_value(
        "secrets_agent_store_operations_total", {"operation": "watch", "outcome": "unavailable"}
    )
    assert unavailable and unavailable >= 2


async def test_a_compacted_watch_start_fails_over_to_a_resync_and_loses_no_change(
    env: AgentEnv, etcd_server: EtcdServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The resync revision was compacted before the watch started: the refresher resyncs."""
    from agent.cache import SecretCache
    from agent.refresh import Refresher

    env.configure(
        store={"type": "etcd", "endpoints": [etcd_server.endpoint], "prefix": _prefix()},
        refresh={"interval": "1h", "watch_interval": "1h", "backoff_initial": "100ms"},
    )
    config = env.config()
    core = Core.build(config)
    writer = Core.build(config)
    cache = SecretCache(core.resolver, settings=config.refresh, metrics=core.metrics)
    refresher = Refresher(
        cache, core.store, settings=config.refresh, patterns=["db"], metrics=core.metrics
    )
    try:
        await writer.writer().put("db", b"v1")
        await refresher.load_all()
        assert (await cache.get("db")).secret.value.reveal() == b"v1"
        store = core.store
        assert isinstance(store, EtcdStore)
        _, old_revision = await store._client.count(b"/")
        await writer.writer().put("db", b"v2")  # a change the compaction will erase
        _, now = await store._client.count(b"/")
        _gateway(etcd_server, "kv/compaction", {"revision": now, "physical": True})
        real_count = type(store._client).count
        stale = iter([old_revision])

        async def count(self: Any, prefix: bytes) -> tuple[int, int]:
            n, rev = await real_count(self, prefix)
            return n, next(stale, rev)  # the first watch starts at a compacted revision

        monkeypatch.setattr(type(store._client), "count", count)
        task = asyncio.create_task(refresher.run())
        try:
            async with asyncio.timeout(BOUND):
                # The compacted watch fails after its resync; the refresher restarts it.
                while not _sample(core, "secrets_agent_watch_events_total", kind="restart"):
                    await asyncio.sleep(0.02)
                assert (await cache.get("db")).secret.value.reveal() == b"v2"
                while _sample(core, "secrets_agent_watch_events_total", kind="event") < 2:
                    await asyncio.sleep(0.02)  # the restarted watch resynced too
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    finally:
        await cache.aclose()
        await core.aclose()
        await writer.aclose()


async def test_a_hung_etcd_breaks_a_quiet_watch_instead_of_leaving_it_waiting(
    etcd_server: EtcdServer,
) -> None:
    """SIGSTOP (a partition: no reset, no answer): the watch fails instead of hanging."""
    async with _store(etcd_server.endpoint, timeout=2.0, keepalive=6.0) as store:
        events = store.watch()
        assert await _next(events) == WatchEvent(None)
        os.kill(etcd_server.pid, signal.SIGSTOP)
        try:
            with pytest.raises(BackendUnavailable):
                await _next(events, timeout=20)
        finally:
            os.kill(etcd_server.pid, signal.SIGCONT)


async def test_endpoints_are_tried_in_turn(etcd_server: EtcdServer) -> None:
    dead = f"127.0.0.1:{free_port()}"
    async with _store([dead, etcd_server.endpoint], timeout=2.0) as store:
        with pytest.raises(BackendUnavailable):
            await store.list_names()
        assert await store.list_names() == []  # the next call went to the next endpoint


# --------------------------------------------------------------------------- TLS


def _cert(
    subject: str, key: ec.EllipticCurvePrivateKey, issuer: tuple[x509.Certificate, Any] | None
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer[0].subject if issuer else name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
    )
    if issuer is None:
        builder = builder.add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
    else:
        san = [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
        builder = builder.add_extension(x509.SubjectAlternativeName(san), False)
    return builder.sign(issuer[1] if issuer else key, hashes.SHA256())


def _write_pki(directory: Path) -> dict[str, Path]:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, as PEM files."""
    directory.mkdir(parents=True, exist_ok=True)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _cert("test-ca", ca_key, None)
    paths = {"ca": directory / "ca.pem"}
    paths["ca"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    for who in ("server", "client"):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = _cert(who, key, (ca, ca_key))
        paths[f"{who}_cert"] = directory / f"{who}.pem"
        paths[f"{who}_key"] = directory / f"{who}-key.pem"
        paths[f"{who}_cert"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        paths[f"{who}_key"].write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
    return paths


class _TlsEtcd(EtcdServer):
    """etcd serving clients over TLS and requiring a client certificate."""

    def __init__(self, *, pki: dict[str, Path], **kw: Any) -> None:
        super().__init__(**kw)
        self.pki = pki

    @property
    def client_url(self) -> str:
        return f"https://{self.endpoint}"

    def _argv(self) -> list[str]:
        return [
            *super()._argv(),
            f"--cert-file={self.pki['server_cert']}",
            f"--key-file={self.pki['server_key']}",
            f"--trusted-ca-file={self.pki['ca']}",
            "--client-cert-auth",
        ]

    def _ready(self) -> bool:
        ctx = ssl.create_default_context(cafile=str(self.pki["ca"]))
        ctx.load_cert_chain(self.pki["client_cert"], self.pki["client_key"])
        with urllib.request.urlopen(f"{self.client_url}/health", timeout=2, context=ctx) as r:
            return bool(json.loads(r.read()).get("health") == "true")


@contextlib.contextmanager
def _extra_etcd(cls: type[EtcdServer], root: Path, **kw: Any) -> Iterator[EtcdServer]:
    binary = require(shutil.which("etcd") or "/usr/bin/etcd", "etcd (apt install etcd-server)")
    server = cls(binary=binary, data_dir=root / "data", log_path=root / "etcd.log", **kw)
    server.launch()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def tls_etcd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[_TlsEtcd]:
    root = tmp_path_factory.mktemp("etcd-tls")
    with _extra_etcd(_TlsEtcd, root, pki=_write_pki(root / "pki")) as server:
        assert isinstance(server, _TlsEtcd)
        yield server


async def test_tls_with_a_client_certificate_from_the_config(
    env: AgentEnv, tls_etcd: _TlsEtcd
) -> None:
    pki = tls_etcd.pki
    env.configure(
        store={
            "type": "etcd",
            "endpoints": [f"https://{tls_etcd.endpoint}"],
            "prefix": _prefix(),
            "tls": {
                "ca": str(pki["ca"]),
                "cert": str(pki["client_cert"]),
                "key": str(pki["client_key"]),
            },
        }
    )
    core = Core.build(load_config(env.config_path))
    try:
        await core.writer().put("tls/db", b"over tls")
        secret = await core.resolver.fetch(
            "tls/db", (await core.store.read_stages("tls/db")).stages["CURRENT"]
        )
        assert secret.value.reveal() == b"over tls"
    finally:
        await core.aclose()


async def test_tls_without_the_client_certificate_or_in_plaintext_fails_as_unavailable(
    tls_etcd: _TlsEtcd,
) -> None:
    ca_only = EtcdTls(ca=tls_etcd.pki["ca"].read_bytes())
    for tls in (ca_only, None):
        async with _store(tls_etcd.endpoint, tls=tls, timeout=2.0) as store:
            with pytest.raises(BackendUnavailable):
                await store.list_names()


def test_tls_config_errors_name_the_field(env: AgentEnv, tmp_path: Path) -> None:
    pem = tmp_path / "c.pem"
    pem.write_text("x")
    for tls in ({"ca": str(tmp_path / "missing.pem")}, {"cert": str(pem)}):
        env.configure(store={"type": "etcd", "tls": tls})
        with pytest.raises(ConfigError) as err:
            Core.build(env.config())
        assert err.value.path == "store.tls"


# --------------------------------------------------------------------------- users and roles


class _AuthEtcd(EtcdServer):
    """etcd whose auth tokens expire after one idle second (the default is 5 minutes)."""

    def _argv(self) -> list[str]:
        return [*super()._argv(), "--auth-token-ttl=1"]


@pytest.fixture(scope="module")
def auth_etcd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdServer]:
    """Auth enabled; users ``reader`` (read on /sa/) and ``writer`` (readwrite on /sa/)."""
    with _extra_etcd(_AuthEtcd, tmp_path_factory.mktemp("etcd-auth")) as server:
        perm = {"key": _b64("/sa/"), "range_end": _b64("/sa0")}
        _gateway(server, "auth/user/add", {"name": "root", "password": "root-pw"})
        _gateway(server, "auth/user/grant", {"user": "root", "role": "root"})
        for user, perm_type in (("reader", "READ"), ("writer", "READWRITE")):
            _gateway(server, "auth/role/add", {"name": user})
            _gateway(
                server, "auth/role/grant", {"name": user, "perm": {**perm, "permType": perm_type}}
            )
            _gateway(server, "auth/user/add", {"name": user, "password": f"{user}-pw"})
            _gateway(server, "auth/user/grant", {"user": user, "role": user})
        _gateway(server, "auth/enable", {})
        yield server


async def test_a_reader_reads_and_is_denied_writes_for_good(auth_etcd: EtcdServer) -> None:
    prefix = f"/sa/{uuid.uuid4().hex[:8]}"
    async with _store(
        auth_etcd.endpoint, prefix=prefix, username="writer", password="writer-pw"
    ) as w:
        await w.write_version("db", "v1", b"env")
        await w.set_stages("db", {"CURRENT": "v1"}, expected_revision="")
    metrics = Metrics()
    async with _store(
        auth_etcd.endpoint, prefix=prefix, username="reader", password="reader-pw", metrics=metrics
    ) as reader:
        assert (await reader.read_stages("db")).stages == {"CURRENT": "v1"}
        assert (await reader.read_version("db", "v1")).envelope == b"env"
        with pytest.raises(AccessDenied):
            await reader.write_version("db", "v2", b"env2")
        with pytest.raises(AccessDenied):
            await reader.set_stages("db", {"CURRENT": "v1"}, expected_revision="")
    denied = metrics.registry.get_sample_value(
        "secrets_agent_store_operations_total", {"operation": "write_version", "outcome": "error"}
    )
    assert denied == 1


async def test_wrong_or_missing_credentials_are_access_denied(auth_etcd: EtcdServer) -> None:
    async with _store(auth_etcd.endpoint, username="reader", password="wrong") as store:
        with pytest.raises(AccessDenied):
            await store.list_names()
    async with _store(auth_etcd.endpoint) as anonymous:
        with pytest.raises(AccessDenied):
            await anonymous.list_names()


async def test_an_expired_auth_token_is_renewed_without_an_error(auth_etcd: EtcdServer) -> None:
    async with _store(
        auth_etcd.endpoint, prefix="/sa/x", username="reader", password="reader-pw"
    ) as store:
        assert await store.list_names() == []
        await asyncio.sleep(2.5)  # the token's TTL (1 s) passes with the agent idle
        assert await store.list_names() == []


def test_a_username_without_a_password_is_a_config_error() -> None:
    with pytest.raises(ConfigError):
        EtcdStore("127.0.0.1:2379", username="agent")
