"""The compose services', the systemd unit's and the app examples' commands, run on this machine.

No Docker and no systemd here: each service's command runs from the venv,
with its config as shipped and only the paths moved (container or system
paths to a temp dir on tmpfs), the etcd endpoint pointed at the test's etcd,
and the metrics port at a free loopback port.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from asyncio.subprocess import PIPE
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.agentenv import AgentEnv
from tests.servers import EtcdServer, free_port

pytestmark = pytest.mark.integration

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
BIN = Path(sys.executable).parent


@pytest.fixture
def shm() -> Iterator[Path]:
    """A short private tmpfs directory (rendered files refuse disks; sockets want short paths)."""
    path = Path(tempfile.mkdtemp(prefix="sa-ex-", dir="/dev/shm"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _env(**extra: str) -> dict[str, str]:
    return {"PATH": f"{BIN}:/usr/bin:/bin", "HOME": os.environ.get("HOME", "/"), **extra}


def _wait_ready(env: dict[str, str], agent: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if agent.poll() is not None:
            raise AssertionError(agent.communicate()[1].decode())
        proc = subprocess.run(
            ["secrets-agent", "health", "--ready"], env=env, capture_output=True, timeout=30
        )
        if proc.returncode == 0:
            return
        time.sleep(0.3)
    raise AssertionError("the agent did not become ready")


def _stop(agent: subprocess.Popen[bytes]) -> None:
    agent.terminate()
    try:
        agent.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        agent.kill()
        agent.communicate()


def _compose() -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load((EXAMPLES / "docker-compose.yml").read_text())
    return doc


def test_compose_file_wires_the_services_together() -> None:
    services = _compose()["services"]
    assert set(services) == {"etcd", "setup", "agent", "app", "prometheus"}
    agent, app = services["agent"], services["app"]
    assert agent["read_only"] is True and agent["cap_drop"] == ["ALL"]
    assert agent["depends_on"]["setup"]["condition"] == "service_completed_successfully"
    assert app["depends_on"]["agent"]["condition"] == "service_healthy"
    shared = {v.split(":")[0] for v in agent["volumes"]} & {v.split(":")[0] for v in app["volumes"]}
    assert "run" in shared
    assert "tmpfs" in str(_compose()["volumes"]["run"])
    assert "./compose/agent.yaml:/etc/secrets-agent/agent.yaml:ro" in agent["volumes"]


def test_compose_services_commands_run_here(
    etcd_server: EtcdServer,
    prometheus_server: Callable[..., Any],
    shm: Path,
) -> None:
    services = _compose()["services"]
    port = free_port()
    conf, state, run = shm / "conf", shm / "state", shm / "run"
    for d in (conf, state, run):
        d.mkdir(mode=0o700)
    text = (EXAMPLES / "compose" / "agent.yaml").read_text()
    text = (
        text.replace("/etc/secrets-agent", str(conf))
        .replace("/var/lib/secrets-agent", str(state))
        .replace("/run/secrets-agent", str(run))
        .replace('"etcd:2379"', f'"{etcd_server.endpoint}"')
        .replace("/secrets-agent/demo", f"/compose-{port}")
        .replace('"0.0.0.0:9464"', f'"127.0.0.1:{port}"')
        .replace("uids: [10002]", f"uids: [{os.getuid()}]")  # the app runs as us here
    )
    (conf / "agent.yaml").write_text(text)
    (run / "files").mkdir(mode=0o711)

    def env_of(service: str) -> dict[str, str]:
        raw = services[service].get("environment", {})
        moved = {
            k: v.replace("/etc/secrets-agent", str(conf)).replace("/run/secrets-agent", str(run))
            for k, v in raw.items()
        }
        return _env(**moved)

    # setup: as written (sh -c '...'); twice, as a restarted stack would
    setup = services["setup"]
    assert setup["entrypoint"] == ["sh", "-c"]
    for _ in range(2):
        proc = subprocess.run(
            ["sh", "-c", setup["command"][0]], env=env_of("setup"), capture_output=True, timeout=120
        )
        assert proc.returncode == 0, proc.stderr.decode()

    agent_env = env_of("agent")
    agent = subprocess.Popen(
        ["secrets-agent", *services["agent"]["command"]],
        env=agent_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        _wait_ready(agent_env, agent)
        app_env = env_of("app")
        app = [sys.executable, str(EXAMPLES / "compose" / "app.py"), "--once"]
        first = subprocess.run(app, env=app_env, capture_output=True, text=True, timeout=60)
        assert first.returncode == 0, first.stderr
        assert "file and socket give the same value" in first.stdout
        assert "correct horse" not in first.stdout  # the app prints digests only

        # Prometheus with the shipped alert rules scrapes the agent
        rules = [EXAMPLES / "prometheus" / "alerts.yml"]
        job = yaml.safe_load((EXAMPLES / "prometheus" / "prometheus.yml").read_text())
        prometheus = prometheus_server(
            [f"127.0.0.1:{port}"], rule_files=rules, job=job["scrape_configs"][0]["job_name"]
        )
        prometheus.wait_for_target_up(30)

        # the rotation command from the compose file's header
        header = (EXAMPLES / "docker-compose.yml").read_text()
        rotate = re.search(r"sh -c '(.+)'", header)
        assert rotate is not None
        errors = []
        for _ in range(3):  # a loaded machine can time out one etcd call (5s); not the point here
            proc = subprocess.run(
                ["sh", "-c", rotate.group(1)], env=env_of("setup"), capture_output=True, timeout=60
            )
            if proc.returncode == 0:
                break
            errors.append(proc.stderr.decode())
            time.sleep(1)
        assert proc.returncode == 0, errors
        deadline = time.monotonic() + 30
        while True:
            now = subprocess.run(app, env=app_env, capture_output=True, text=True, timeout=60)
            if now.returncode == 0 and now.stdout.split()[1] != first.stdout.split()[1]:
                break
            assert time.monotonic() < deadline, now.stdout + now.stderr
            time.sleep(0.5)
        assert "file and socket give the same value" in now.stdout
        up = prometheus.query('up{job="secrets-agent"}')
        assert up and up[0]["value"][1] == "1"
    finally:
        _stop(agent)


def _unit() -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in (EXAMPLES / "systemd" / "secrets-agent.service").read_text().splitlines():
        if "=" in line and not line.startswith("#"):
            key, _, value = line.partition("=")
            out.setdefault(key, []).append(value)
    return out


def test_systemd_units_commands_run_here_with_its_config(shm: Path) -> None:
    unit = _unit()
    roots = {
        "RuntimeDirectory": ("/run", shm / "run"),
        "StateDirectory": ("/var/lib", shm / "lib"),
        "LogsDirectory": ("/var/log", shm / "log"),
    }
    for key, (_, local) in roots.items():
        for name in unit[key][0].split():  # what systemd creates before starting us
            (local / name).mkdir(parents=True, exist_ok=True, mode=0o700)
    text = (EXAMPLES / "systemd" / "agent.yaml").read_text()
    for system, local in roots.values():
        text = text.replace(f"{system}/secrets-agent", f"{local}/secrets-agent")
    port = free_port()
    group = subprocess.run(["id", "-gn"], capture_output=True, text=True).stdout.strip()
    text = (
        text.replace("socket_group: secrets-agent", f"socket_group: {group}")
        .replace('"127.0.0.1:9464"', f'"127.0.0.1:{port}"')
        .replace("uids: [1000]", f"uids: [{os.getuid()}]")
    )
    (shm / "run" / "secrets-agent" / "files").mkdir(mode=0o711)
    config = shm / "agent.yaml"
    config.write_text(text)

    def command(line: str) -> list[str]:
        argv = shlex.split(line)
        assert argv[0] == "/usr/local/bin/secrets-agent"
        return [str(BIN / "secrets-agent"), "-c", str(config), *argv[3:]]

    env = _env(SECRETS_AGENT_CONFIG=str(config))
    for pre in unit["ExecStartPre"]:
        proc = subprocess.run(command(pre), env=env, capture_output=True, timeout=60)
        assert proc.returncode == 0, proc.stderr.decode()
    put = subprocess.run(
        ["secrets-agent", "put", "app/db-password"],
        input=b"from-the-host",
        env=env,
        capture_output=True,
        timeout=60,
    )
    assert put.returncode == 0, put.stderr.decode()
    agent = subprocess.Popen(
        command(unit["ExecStart"][0]),
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        _wait_ready(env, agent)
        rendered = shm / "run" / "secrets-agent" / "files" / "db-password"
        assert rendered.read_bytes() == b"from-the-host"
        assert (shm / "run" / "secrets-agent" / "agent.sock").is_socket()
    finally:
        _stop(agent)
    audit = (shm / "log" / "secrets-agent" / "audit.log").read_text()
    assert '"key_created"' in audit and '"rendered"' in audit
    assert "from-the-host" not in audit


async def test_the_read_secret_example_reads_through_the_socket(env: AgentEnv) -> None:
    """examples/read_secret.py, as getting-started.md points at it: a value, and a missing one."""
    env.put("app/db", json.dumps({"password": "pw-12345"}), "--json")
    example = EXAMPLES / "read_secret.py"
    environ = {**os.environ, "SECRETS_AGENT_SOCKET": str(env.socket)}
    async with env.running():
        for args, code, text in (
            (["app/db", "password"], 0, b"app/db: 8 characters read (not printed)"),
            (["app/missing"], 1, b"not found"),
        ):
            proc = await asyncio.create_subprocess_exec(
                sys.executable, str(example), *args, env=environ, stdout=PIPE, stderr=PIPE
            )
            out, err = await asyncio.wait_for(proc.communicate(), 60)
            assert proc.returncode == code, err
            assert text in out + err
            assert b"pw-12345" not in out + err
