"""``secrets-agent exec`` with real child processes."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

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
