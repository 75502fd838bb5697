"""The running agent on its Unix socket, end to end on the default backends."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.agentenv import AgentEnv


def _unwraps(daemon: object) -> float:
    registry = daemon.metrics.registry  # type: ignore[attr-defined]
    value = registry.get_sample_value(
        "secrets_agent_key_operations_total",
        {"provider": "local", "operation": "unwrap", "outcome": "ok"},
    )
    return value or 0.0


async def test_serves_stages_versions_keys_and_raw(env: AgentEnv) -> None:
    v1 = env.put("prod/db", '{"password": "old"}')
    v2 = env.put("prod/db", '{"password": "new", "port": 5432}')
    async with env.running() as agent:
        status, headers, body = await agent.get("/v1/secrets/prod/db")
        doc = json.loads(body)
        assert status == 200
        assert doc["version_id"] == v2 and doc["version_stages"] == ["CURRENT"]
        assert json.loads(doc["value"])["password"] == "new"
        assert headers["Cache-Control"] == "no-store"
        assert await agent.value("prod/db", stage="PREVIOUS") == b'{"password": "old"}'
        assert await agent.value("prod/db", stage="AWSPREVIOUS") == b'{"password": "old"}'
        assert await agent.value("prod/db", version=v1) == b'{"password": "old"}'
        assert await agent.value("prod/db", key="password") == b"new"
        status, _, body = await agent.get("/v1/secrets/prod/db", key="port")
        assert json.loads(body)["value"] == 5432
        status, _, body = await agent.get("/v1/secrets")
        assert [s["name"] for s in json.loads(body)["secrets"]] == ["prod/db"]


async def test_binary_values_are_base64_in_json(env: AgentEnv, tmp_path: Path) -> None:
    blob = bytes(range(256))
    (tmp_path / "b").write_bytes(blob)
    assert env.cli("put", "bin", "--binary", "--file", str(tmp_path / "b"))[0] == 0
    async with env.running() as agent:
        _, _, body = await agent.get("/v1/secrets/bin")
        assert base64.b64decode(json.loads(body)["value_base64"]) == blob
        assert await agent.value("bin") == blob


@pytest.mark.parametrize(
    ("path", "params", "status", "code"),
    [
        ("/v1/secrets/missing", {}, 404, "secret_not_found"),
        ("/v1/secrets/prod/db", {"stage": "PENDING"}, 404, "version_not_found"),
        ("/v1/secrets/prod/db", {"version": "nope"}, 404, "version_not_found"),
        ("/v1/secrets/prod/db", {"key": "nope"}, 404, "key_not_found"),
        ("/v1/secrets/prod/db", {"bogus": "1"}, 400, "bad_request"),
        ("/v1/secrets/prod/db", {"format": "xml"}, 400, "bad_request"),
        ("/v1/secrets/prod/db", {"stage": "bad stage!"}, 400, "bad_request"),
        ("/v1/secrets/a%2F%2Fb", {}, 400, "invalid_name"),
        ("/v1/secrets/" + "x" * 600, {}, 400, "invalid_name"),
        ("/nope", {}, 404, "not_found"),
    ],
)
async def test_bad_requests_get_json_errors(
    env: AgentEnv, path: str, params: dict[str, str], status: int, code: str
) -> None:
    env.put("prod/db", '{"password": "pw"}')
    async with env.running() as agent:
        got, headers, body = await agent.get(path, **params)
        assert got == status, body
        assert headers["Content-Type"].startswith("application/json")
        doc = json.loads(body)
        assert doc["error"]["code"] == code
        assert "pw" not in doc["error"]["message"]


async def test_other_methods_are_405(env: AgentEnv) -> None:
    env.put("a", "v")
    async with (
        env.running() as agent,
        agent.session.post("http://localhost/v1/secrets/a") as resp,
    ):
        assert resp.status == 405
        assert (await resp.json())["error"]["code"] == "method_not_allowed"


async def test_socket_is_private_chmodded_and_removed_on_exit(env: AgentEnv) -> None:
    env.put("a", "v")
    async with env.running():
        mode = stat.S_IMODE(env.socket.stat().st_mode)
        assert stat.S_ISSOCK(env.socket.stat().st_mode)
        assert mode == 0o660
    assert not env.socket.exists()


async def test_rotation_is_served_at_once_through_the_watch(env: AgentEnv) -> None:
    env.put("rot", "v1")
    async with env.running() as agent:
        assert await agent.value("rot") == b"v1"
        env.put("rot", "v2")
        await agent.eventually("rot", b"v2", timeout=10)
        assert await agent.value("rot", stage="PREVIOUS") == b"v1"


async def test_cold_start_of_1000_secrets_unwraps_at_most_two_data_keys(
    env: AgentEnv, tmp_path: Path
) -> None:
    doc = {f"bulk/s{i:04d}": f"value-{i}" for i in range(1000)}
    (tmp_path / "bulk.json").write_text(json.dumps(doc))
    assert env.cli("import", str(tmp_path / "bulk.json"))[0] == 0
    async with env.running() as agent:
        assert len(agent.daemon.cache.names()) == 1000
        assert _unwraps(agent.daemon) <= 2
        assert await agent.value("bulk/s0500") == b"value-500"


async def test_fifty_concurrent_first_reads_unwrap_once(env: AgentEnv) -> None:
    env.put("hot", "value")
    env.configure(secrets=[])  # nothing preloaded: the reads below are the first
    async with env.running() as agent:
        assert _unwraps(agent.daemon) == 0
        values = await asyncio.gather(*(agent.value("hot") for _ in range(50)))
        assert values == [b"value"] * 50
        assert _unwraps(agent.daemon) == 1


async def test_envelope_moved_into_another_version_is_refused_and_last_good_served(
    env: AgentEnv, caplog: pytest.LogCaptureFixture
) -> None:
    env.put("victim", "good-value")
    env.put("other", "attacker-value")
    async with env.running() as agent:
        assert await agent.value("victim") == b"good-value"
        # An attacker with write access to the store copies another secret's
        # envelope into a new version of "victim" and points CURRENT at it.
        secrets_dir = env.dir / "store" / "secrets"
        other_state = json.loads((secrets_dir / "other" / "stages.json").read_text())
        src = secrets_dir / "other" / "versions" / f"{other_state['CURRENT']}.json"
        shutil.copy(src, secrets_dir / "victim" / "versions" / "evil.json")
        stages = json.loads((secrets_dir / "victim" / "stages.json").read_text())
        stages = {"CURRENT": "evil", "PREVIOUS": stages["CURRENT"]}
        (secrets_dir / "victim" / "stages.json").write_text(json.dumps(stages))
        with caplog.at_level(logging.WARNING):
            for _ in range(50):
                await asyncio.sleep(0.05)
                if any("refused" in r.getMessage() for r in caplog.records):
                    break
        assert await agent.value("victim") == b"good-value"
        # The hand-written stage map carries no proof: refused before any envelope is read.
        messages = " ".join(r.getMessage() for r in caplog.records)
        assert "stage map of secret 'victim' carries no proof" in messages
        assert "attacker-value" not in messages and "good-value" not in messages
        _, _, body = await agent.get("/v1/status")
        (refusal,) = json.loads(body)["stage_maps_refused"]
        assert (refusal["secret"], refusal["reason"]) == ("victim", "unproven")


async def test_no_plaintext_in_store_logs_metrics_or_status(
    env: AgentEnv, caplog: pytest.LogCaptureFixture
) -> None:
    values = {f"leak/s{i}": f"PLAINTEXT-MARKER-{i}-{os.urandom(4).hex()}" for i in range(5)}
    for name, value in values.items():
        env.put(name, value)
    with caplog.at_level(logging.DEBUG):
        async with env.running() as agent:
            for name, value in values.items():
                assert await agent.value(name) == value.encode()
            env.put("leak/s0", "PLAINTEXT-MARKER-rotated")
            await agent.eventually("leak/s0", b"PLAINTEXT-MARKER-rotated")
            bodies = [(await agent.get(p))[2] for p in ("/metrics", "/v1/status", "/v1/secrets")]
    needles = [*values.values(), "PLAINTEXT-MARKER-rotated"]
    haystacks = [p.read_bytes() for p in (env.dir / "store").rglob("*") if p.is_file()]
    haystacks += [*bodies, caplog.text.encode()]
    for needle in needles:
        forms = [needle.encode(), base64.b64encode(needle.encode()), needle.encode().hex().encode()]
        for hay in haystacks:
            for form in forms:
                assert form not in hay


def test_sigterm_stops_a_hardened_agent_gracefully_and_removes_the_socket(env: AgentEnv) -> None:
    env.put("a", "v")
    proc = subprocess.Popen(
        [sys.executable, "-m", "agent", "-c", str(env.config_path), "run"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 20
        while not env.socket.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert env.socket.exists()
        # Hardened at start: no core dumps (a core file would hold every secret).
        limits = Path(f"/proc/{proc.pid}/limits").read_text()
        core_line = next(line for line in limits.splitlines() if "core file" in line)
        assert core_line.split()[4:6] == ["0", "0"], core_line
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=20)
        assert proc.returncode == 0
        assert not env.socket.exists()
        assert b"shutting down" in out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
