"""Fault injection: the running agent SIGKILLed in the middle of a scheduled rotation."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import stat
import subprocess
import sys
import time

import pytest

from tests.agentenv import AgentEnv
from tests.rotation.test_kill import SCRIPT

pytestmark = pytest.mark.integration


def _agent(env: AgentEnv, log: str) -> subprocess.Popen[bytes]:
    with open(env.dir / log, "wb") as out:  # kept for the failure report
        return subprocess.Popen(
            [sys.executable, "-m", "agent", "-c", str(env.config_path), "run"],
            stdout=subprocess.DEVNULL,
            stderr=out,
            start_new_session=True,
        )


def _logs(env: AgentEnv) -> str:
    return "\n".join(
        f"--- {p.name}\n{p.read_text(errors='replace')}"
        for p in sorted(env.dir.glob("agent-*.log"))
    )


def _kill_script(env: AgentEnv, step: str) -> None:
    """Kill a held rotator script and its sleep (its own session: kill the group)."""
    with contextlib.suppress(ProcessLookupError, ValueError, FileNotFoundError):
        os.killpg(int((env.dir / f"inside-{step}").read_text()), signal.SIGKILL)


def _wait(predicate: object, proc: subprocess.Popen[bytes], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return
        assert proc.poll() is None, "the agent exited"
        time.sleep(0.02)
    raise AssertionError("timed out")


def _calls(env: AgentEnv) -> list[str]:
    path = env.dir / "calls"
    return path.read_text().splitlines() if path.exists() else []


def _describe(env: AgentEnv) -> dict[str, object]:
    code, out, err = env.cli("describe", "app/key", "--json")
    assert code == 0, err
    doc: dict[str, object] = json.loads(out)
    return doc


def test_an_agent_killed_in_set_keeps_current_and_its_restart_resumes_the_same_pending(
    env: AgentEnv,
) -> None:
    script = env.dir / "rot.sh"
    script.write_text(SCRIPT)
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    env.configure(
        rotation=[
            {
                "secret": "app/key",
                "every": "2s",
                "rotator": "command",
                "params": {"command": str(script)},
            }
        ],
        audit={"path": str(env.dir / "audit.log")},
    )
    first = env.put("app/key", "initial")
    (env.dir / "block-set").touch()
    inside = env.dir / "inside-set"
    agent = _agent(env, "agent-1.log")
    try:
        # The script writes its pid after creating the file: wait for the pid.
        _wait(lambda: inside.exists() and inside.read_text().strip(), agent)
        agent.send_signal(signal.SIGKILL)
        agent.wait(10)
    finally:
        _kill_script(env, "set")
        if agent.poll() is None:
            agent.kill()
            agent.wait(10)
    # CURRENT is whole and unchanged; the rotation waits as PENDING.
    assert env.cli("get", "app/key") == (0, "initial", "")
    stages: dict[str, str] = _describe(env)["stages"]  # type: ignore[assignment]
    assert stages["CURRENT"] == first
    token = stages["PENDING"]
    assert _calls(env) == [f"create {token}"], _logs(env)

    (env.dir / "block-set").unlink()
    agent = _agent(env, "agent-2.log")
    try:
        _wait(lambda: f"test {token}" in _calls(env), agent)
        # The script's "test" line comes before the agent's finish step: stop
        # the agent only once the finish has moved CURRENT (away from the first
        # version: under load the next 2 s slot may already have rotated again).
        _wait(lambda: _describe(env)["stages"]["CURRENT"] != first, agent)  # type: ignore[index]
    finally:
        agent.send_signal(signal.SIGTERM)
        try:
            agent.wait(30)  # a liveness bound, not a timing
        except subprocess.TimeoutExpired:
            agent.kill()
            agent.wait(10)
            raise AssertionError("the agent did not stop on SIGTERM\n" + _logs(env)) from None
    calls = _calls(env)
    assert calls.count(f"create {token}") == 1, (calls, _logs(env))
    # Resumed from set with the same token: created once, never duplicated.
    assert calls.count(f"create {token}") == 1
    assert calls[1:3] == [f"set {token}", f"test {token}"]
    doc = _describe(env)
    stages = doc["stages"]  # type: ignore[assignment]
    versions = [v["version_id"] for v in doc["versions"]]  # type: ignore[attr-defined]
    assert token in versions and stages["CURRENT"] != first
    assert versions.index(token) == 1  # the first version made after "initial"
    assert env.cli("get", "app/key", "--version", token) == (0, f"value-{token}", "")
    assert "PENDING" not in stages or stages["PENDING"] != token
