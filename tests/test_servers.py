"""The real-server fixtures in tests/servers.py start working servers and clean up."""

from __future__ import annotations

import base64
import json
import os
import socket
import threading
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from tests.servers import (
    EtcdServer,
    MotoServer,
    PostgresServer,
    PrometheusServer,
    ServerProcess,
    ServerStartError,
    SoftHSMToken,
    moto_reset,
    require,
)

integration = pytest.mark.integration


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def _post_json(url: str, body: dict[str, Any]) -> Any:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST")
    with urllib.request.urlopen(req, timeout=5) as resp:
        return json.loads(resp.read())


def _port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(1)
        return sock.connect_ex(("127.0.0.1", port)) == 0


# --- the harness itself -----------------------------------------------------------------


def test_missing_binary_skips_locally(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="frobd not found"):
        require(None, "frobd")


def test_missing_binary_fails_under_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    """CI must never pass by skipping the integration tests."""
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="refusing to skip"):
        require("/nonexistent/frobd", "frobd")


class _ScriptServer(ServerProcess):
    """Runs one shell script per start attempt; ready once it has printed READY."""

    name = "script"

    def __init__(self, tmp_path: Path, scripts: list[str]) -> None:
        super().__init__(log_path=tmp_path / "script.log")
        self.scripts = scripts
        self.attempts = 0
        self.ready_timeout = 5

    def _pick_ports(self) -> None:
        self.attempts += 1

    def _argv(self) -> list[str]:
        return ["sh", "-c", self.scripts[self.attempts - 1]]

    def _ready(self) -> bool:
        return "READY" in self.log_tail()


def test_start_failure_reports_log_tail(tmp_path: Path) -> None:
    server = _ScriptServer(tmp_path, ["echo 'config is broken' >&2; exit 3"])
    with pytest.raises(ServerStartError, match=r"(?s)status 3.*config is broken"):
        server.launch()
    assert not server.running


def test_port_collision_retries_on_fresh_ports(tmp_path: Path) -> None:
    server = _ScriptServer(
        tmp_path,
        [
            "echo 'listen tcp: bind: address already in use' >&2; exit 1",
            "echo READY; exec sleep 30",
        ],
    )
    server.launch()
    try:
        assert server.attempts == 2
        assert server.running
    finally:
        server.stop(timeout=5)
    assert not server.running


# --- etcd -------------------------------------------------------------------------------


@integration
def test_etcd_put_get_survives_restart(etcd_server: EtcdServer) -> None:
    """Data written before stop() is there after start() on the same port and data dir."""
    kv = f"{etcd_server.client_url}/v3/kv"
    _post_json(f"{kv}/put", {"key": _b64("fixture/key"), "value": _b64("value-1")})
    port, old_pid = etcd_server.port, etcd_server.pid

    etcd_server.stop()
    assert not etcd_server.running
    assert not _port_open(port)
    etcd_server.start()

    assert etcd_server.port == port
    assert etcd_server.pid != old_pid
    got = _post_json(f"{kv}/range", {"key": _b64("fixture/key")})
    assert base64.b64decode(got["kvs"][0]["value"]) == b"value-1"
    assert etcd_server.endpoint == f"127.0.0.1:{port}"


# --- moto -------------------------------------------------------------------------------


@integration
def test_moto_secretsmanager_round_trip_and_reset(moto_server: MotoServer) -> None:
    import boto3

    assert os.environ["AWS_ACCESS_KEY_ID"] == "testing"
    client = boto3.client("secretsmanager", endpoint_url=moto_server.endpoint_url)
    client.create_secret(Name="fixture/secret", SecretString="s3cr3t")
    assert client.get_secret_value(SecretId="fixture/secret")["SecretString"] == "s3cr3t"

    moto_reset(moto_server.endpoint_url)
    assert client.list_secrets()["SecretList"] == []


# --- SoftHSM ----------------------------------------------------------------------------


@integration
def test_softhsm_token_aes_encrypt_decrypt(softhsm_token: SoftHSMToken) -> None:
    import pkcs11

    assert os.environ["SOFTHSM2_CONF"] == str(softhsm_token.conf_path)
    token = pkcs11.lib(softhsm_token.module).get_token(token_label=softhsm_token.token_label)
    with token.open(user_pin=softhsm_token.pin, rw=True) as session:
        key = session.generate_key(pkcs11.KeyType.AES, 256, label="fixture-aes")
        iv = session.generate_random(128)
        ciphertext = key.encrypt(b"envelope payload", mechanism_param=iv)
        assert ciphertext != b"envelope payload"
        assert key.decrypt(ciphertext, mechanism_param=iv) == b"envelope payload"


# --- PostgreSQL -------------------------------------------------------------------------


@integration
def test_postgres_accepts_password_and_rejects_wrong_one(postgres_server: PostgresServer) -> None:
    assert postgres_server.psql("SELECT 1").strip() == "1"
    assert postgres_server.dsn.startswith("postgresql://postgres:")
    assert f"@127.0.0.1:{postgres_server.port}/" in postgres_server.dsn
    assert postgres_server.psql("SHOW listen_addresses").strip() == "127.0.0.1"

    real = postgres_server.admin_password
    postgres_server.admin_password = "wrong"
    try:
        with pytest.raises(RuntimeError, match="password authentication failed"):
            postgres_server.psql("SELECT 1")
    finally:
        postgres_server.admin_password = real


@integration
def test_postgres_runs_as_its_own_user(postgres_server: PostgresServer) -> None:
    status = Path(f"/proc/{postgres_server.pid}/status").read_text()
    uid = int(next(line for line in status.splitlines() if line.startswith("Uid:")).split()[1])
    assert uid == (postgres_server.user if postgres_server.user is not None else os.getuid())


# --- Prometheus -------------------------------------------------------------------------


class _MetricsHandler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = b"# TYPE fixture_metric_total counter\nfixture_metric_total 42\n"
        self.send_response(200 if self.path == "/metrics" else 404)
        self.send_header("Content-Type", "text/plain; version=0.0.4")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def metrics_target() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _MetricsHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


@integration
def test_prometheus_scrapes_target(
    prometheus_server: Callable[[Sequence[str]], PrometheusServer], metrics_target: str
) -> None:
    prom = prometheus_server([metrics_target])
    prom.wait_for_target_up(timeout=20)
    result = prom.query("fixture_metric_total")
    assert [r["value"][1] for r in result] == ["42"]
    assert result[0]["metric"]["instance"] == metrics_target
