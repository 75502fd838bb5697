"""Fault injection: a real ``secrets-agent rotate`` SIGKILLed in each step, then run again."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.agentenv import AgentEnv

pytestmark = pytest.mark.integration

SCRIPT = """#!/bin/sh
# A command rotator that can be held inside a step: while block-<step> exists,
# it records its pid and sleeps (bounded), so the test can kill the agent there.
# Each finished step is logged as "<step> <token>" in calls.
dir=$(dirname "$0")
if [ -e "$dir/block-$1" ]; then
    echo $$ > "$dir/inside-$1"
    sleep 20
fi
if [ "$1" = create ]; then echo "value-$3"; fi
echo "$1 $3" >> "$dir/calls"
"""


def rotate(env: AgentEnv) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "agent", "-c", str(env.config_path), "rotate", "app/key"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def wait_for(path: Path, proc: subprocess.Popen[bytes], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and path.read_text().strip():
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.02)
    raise AssertionError(f"{path.name} never appeared")


@pytest.mark.parametrize("step", ["create", "set", "test"])
def test_sigkill_in_a_step_never_loses_current_and_the_next_run_completes(
    env: AgentEnv, step: str
) -> None:
    script = env.dir / "rot.sh"
    script.write_text(SCRIPT)
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    env.configure(
        rotation=[
            {
                "secret": "app/key",
                "every": "30d",
                "rotator": "command",
                "params": {"command": str(script)},
            }
        ]
    )
    first = env.put("app/key", "initial")
    (env.dir / f"block-{step}").touch()
    proc = rotate(env)
    try:
        wait_for(env.dir / f"inside-{step}", proc)
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=10)
    finally:
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int((env.dir / f"inside-{step}").read_text()), signal.SIGKILL)
    assert proc.returncode == -signal.SIGKILL
    # CURRENT is whole and unchanged.
    assert env.cli("get", "app/key") == (0, "initial", "")
    _, out, _ = env.cli("describe", "app/key", "--json")
    doc = json.loads(out)
    assert doc["stages"]["CURRENT"] == first
    pending = doc["stages"].get("PENDING")
    assert (pending is None) == (step == "create")

    (env.dir / f"block-{step}").unlink()
    code, out, err = env.cli("rotate", "app/key")
    assert code == 0, err
    _, out2, _ = env.cli("describe", "app/key", "--json")
    doc = json.loads(out2)
    new = doc["stages"]["CURRENT"]
    assert new != first and doc["stages"]["PREVIOUS"] == first and "PENDING" not in doc["stages"]
    if pending is not None:
        assert new == pending and "(resumed)" in out  # resumed, never duplicated
    assert len(doc["versions"]) == 2
    assert env.cli("get", "app/key") == (0, f"value-{new}", "")
