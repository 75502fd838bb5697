"""``secrets-agent exec`` with real child processes."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from agent.errors import BadRequest
from agent.render.exec import ExecRunner, Reference, field_text, parse_reference
from tests.agentenv import AgentEnv

CHILD = textwrap.dedent("""
    import os, signal, sys, time
    out = sys.argv[1]
    with open(out, "a") as fh:
        fh.write(f"{os.getpid()} {os.environ.get('DB_PASSWORD')} {os.environ.get('API')}\\n")
    def on_term(signum, frame):
        with open(out, "a") as fh:
            fh.write("TERM\\n")
        sys.exit(42)
    signal.signal(signal.SIGTERM, on_term)
    if len(sys.argv) > 2:
        sys.exit(int(sys.argv[2]))
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        time.sleep(0.05)
""")


def _exec(env: AgentEnv, *args: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "agent",
            "-c",
            str(env.config_path),
            "exec",
            "--env",
            "DB_PASSWORD=secret://prod/db#password",
            "--env",
            "API=secret://api/token",
            *args,
        ],
        cwd=str(Path(__file__).resolve().parents[2]),
    )


def _wait_lines(path: Path, n: int, timeout: float = 20) -> list[str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists():
            lines = path.read_text().splitlines()
            if len(lines) >= n:
                return lines
        time.sleep(0.05)
    raise AssertionError(f"{path} did not get {n} lines")


def test_exec_passes_secrets_and_returns_the_child_status(env: AgentEnv, tmp_path: Path) -> None:
    env.put("prod/db", '{"password": "pw-1"}')
    env.put("api/token", "tok")
    out = tmp_path / "out"
    proc = _exec(env, "--", sys.executable, "-c", CHILD, str(out), "7")
    assert proc.wait(timeout=30) == 7
    assert out.read_text().split()[1:] == ["pw-1", "tok"]


def test_exec_forwards_sigterm(env: AgentEnv, tmp_path: Path) -> None:
    env.put("prod/db", '{"password": "pw-1"}')
    env.put("api/token", "tok")
    out = tmp_path / "out"
    proc = _exec(env, "--", sys.executable, "-c", CHILD, str(out))
    try:
        _wait_lines(out, 1)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 42
        assert out.read_text().splitlines()[-1] == "TERM"
    finally:
        if proc.poll() is None:
            proc.kill()


def test_exec_restarts_the_child_when_a_secret_rotates(env: AgentEnv, tmp_path: Path) -> None:
    env.put("prod/db", '{"password": "pw-1"}')
    env.put("api/token", "tok")
    out = tmp_path / "out"
    proc = _exec(
        env,
        "--restart-on-change",
        "--poll",
        "200ms",
        "--stop-timeout",
        "5s",
        "--",
        sys.executable,
        "-c",
        CHILD,
        str(out),
    )
    try:
        first = _wait_lines(out, 1)[0].split()
        env.put("prod/db", '{"password": "pw-2"}')
        lines = _wait_lines(out, 3)  # first start, TERM, second start
        assert lines[1] == "TERM"
        second = lines[2].split()
        assert second[1:] == ["pw-2", "tok"]
        assert second[0] != first[0]  # a new process
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 42
    finally:
        if proc.poll() is None:
            proc.kill()


def test_exec_refuses_a_bad_reference(env: AgentEnv) -> None:
    code, _, err = env.cli("exec", "--env", "X=http://nope", "--", "true")
    assert code == 2 and "expected VAR=secret://NAME" in err


async def test_exec_reads_and_polls_through_the_agent_socket(env: AgentEnv, tmp_path: Path) -> None:
    """With --socket and no config, values and rotations come from the running agent."""
    env.put("prod/db", '{"password": "pw-1"}')
    env.put("api/token", "tok")
    out = tmp_path / "out"
    async with env.running():
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "agent",
            "-c",
            str(tmp_path / "no-config.yaml"),  # the store is out of reach: only the socket
            "exec",
            "--socket",
            str(env.socket),
            "--env",
            "DB_PASSWORD=secret://prod/db#password",
            "--env",
            "API=secret://api/token?stage=CURRENT",
            "--restart-on-change",
            "--poll",
            "200ms",
            "--",
            sys.executable,
            "-c",
            CHILD,
            str(out),
            cwd=str(Path(__file__).resolve().parents[2]),
        )
        try:
            first = (await _await_lines(out, 1))[0].split()
            assert first[1:] == ["pw-1", "tok"]
            await asyncio.to_thread(env.put, "prod/db", '{"password": "pw-2"}')
            lines = await _await_lines(out, 3)
            assert lines[1] == "TERM" and lines[2].split()[1:] == ["pw-2", "tok"]
            proc.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(proc.wait(), 20) == 42
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()


async def _await_lines(path: Path, n: int, timeout: float = 20) -> list[str]:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        if path.exists():
            lines = path.read_text().splitlines()
            if len(lines) >= n:
                return lines
        await asyncio.sleep(0.05)
    raise AssertionError(f"{path} did not get {n} lines")


async def test_a_sigterm_before_the_child_starts_means_it_never_starts(tmp_path: Path) -> None:
    gate = asyncio.Event()

    async def resolve(ref: Reference) -> tuple[str, str]:
        await gate.wait()  # still resolving when the signal arrives
        return "value", "v1"

    marker = tmp_path / "started"
    runner = ExecRunner(
        [sys.executable, "-c", f"open({str(marker)!r}, 'w')"],
        [parse_reference("X=secret://a")],
        resolve,
    )
    task = asyncio.create_task(runner.run())
    await asyncio.sleep(0.05)  # let run() install its signal handlers
    os.kill(os.getpid(), signal.SIGTERM)
    await asyncio.sleep(0.05)
    gate.set()
    assert await asyncio.wait_for(task, 10) == 128 + signal.SIGTERM
    assert not marker.exists()


def test_references_parse_and_bad_values_are_refused_by_name() -> None:
    ref = parse_reference("DB=secret://prod/db#password?stage=AWSPREVIOUS")
    assert (ref.var, ref.name, ref.key, ref.stage) == ("DB", "prod/db", "password", "PREVIOUS")
    assert parse_reference("DB=secret://prod/db?stage=PREVIOUS#pass%23word") == Reference(
        "DB", "prod/db", "pass#word", "PREVIOUS"
    )
    with pytest.raises(BadRequest, match="unknown option"):
        parse_reference("DB=secret://prod/db?version=x")
    with pytest.raises(BadRequest, match="DB: secret 'b' is not UTF-8 text"):
        field_text(b"\xff\xfe", parse_reference("DB=secret://b"))
    with pytest.raises(BadRequest, match="DB: secret 'b' has no key 'k'"):
        field_text(b'{"x": "s3cr3t"}', parse_reference("DB=secret://b#k"))
    assert field_text(b'{"k": {"a": 1}}', parse_reference("DB=secret://b#k")) == '{"a": 1}'
