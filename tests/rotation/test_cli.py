"""``secrets-agent rotate`` and the rotation part of ``describe``, in process."""

from __future__ import annotations

import hashlib
import json
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.agentenv import AgentEnv, agent_dir


@pytest.fixture
def env() -> Iterator[AgentEnv]:
    with agent_dir() as e:
        yield e


def test_rotate_with_a_rule_from_the_config(env: AgentEnv) -> None:
    env.configure(
        rotation=[
            {"secret": "app/pw", "every": "30d", "rotator": "random", "params": {"length": 20}}
        ]
    )
    old = env.put("app/pw", "hunter2")
    code, out, err = env.cli("rotate", "app/pw")
    assert code == 0, err
    assert "rotated to version" in out and "steps create set test finish" in out
    code, value, _ = env.cli("get", "app/pw")
    assert len(value) == 20 and value != "hunter2"
    code, prev, _ = env.cli("get", "app/pw", "--stage", "PREVIOUS")
    assert prev == "hunter2"
    code, out, _ = env.cli("describe", "app/pw", "--json")
    doc = json.loads(out)
    assert doc["stages"]["PREVIOUS"] == old
    rot = doc["rotation"]
    assert rot["rule"]["rotator"] == "random" and rot["pending_version"] is None
    assert rot["due_now"] is False and rot["next_scheduled"]
    assert rot["agent"] is None  # no agent running
    code, text, _ = env.cli("describe", "app/pw")
    assert "rotation:" in text and "next scheduled:" in text


def test_rotate_flags_override_and_unknown_rotators_are_usage_errors(env: AgentEnv) -> None:
    env.put("app/pw", "hunter2")
    code, _, err = env.cli("rotate", "app/pw")
    assert code == 2 and "no rotation rule" in err
    code, _, err = env.cli("rotate", "app/pw", "--rotator", "nope")
    assert code == 2 and "unknown rotator" in err
    code, _, err = env.cli("rotate", "app/pw", "--rotator", "random", "--param", "length=3")
    assert code == 2 and "params.length" in err
    code, _, err = env.cli(
        "rotate", "app/pw", "--rotator", "random", "--param", "length=9", "--param", "digits=false"
    )
    assert code == 0, err
    _, value, _ = env.cli("get", "app/pw")
    assert len(value) == 9 and not any(c.isdigit() for c in value)


def test_a_failing_command_leaves_current_and_a_dry_run_shows_where_it_resumes(
    env: AgentEnv, tmp_path: Path
) -> None:
    flag = tmp_path / "fail-test"
    cmd = tmp_path / "rot.sh"
    cmd.write_text(
        "#!/bin/sh\n"
        'if [ "$1" = create ]; then echo rotated-value; fi\n'
        f'if [ "$1" = test ] && [ -e {flag} ]; then exit 1; fi\n'
    )
    cmd.chmod(cmd.stat().st_mode | stat.S_IXUSR)
    env.configure(
        rotation=[
            {
                "secret": "app/pw",
                "every": "30d",
                "rotator": "command",
                "params": {"command": str(cmd)},
            }
        ]
    )
    env.put("app/pw", "hunter2")
    flag.touch()
    code, _, err = env.cli("rotate", "app/pw")
    assert code == 1 and "failed at step test" in err and "CURRENT is unchanged" in err
    assert "rotated-value" not in err
    assert env.cli("get", "app/pw")[1] == "hunter2"
    code, out, _ = env.cli("rotate", "app/pw", "--dry-run")
    assert code == 0 and "resume PENDING" in out and "from step 'set'" in out
    code, out, _ = env.cli("describe", "app/pw", "--json")
    assert json.loads(out)["rotation"]["pending_version"]
    flag.unlink()
    code, out, err = env.cli("rotate", "app/pw")
    assert code == 0, err
    assert "(resumed)" in out and "steps set test finish" in out
    assert env.cli("get", "app/pw")[1] == "rotated-value"
    audit = [json.loads(line) for line in (env.dir / "audit.log").read_text().splitlines()]
    steps = [(r["stage"], r["outcome"]) for r in audit if r["event"] == "rotation_step"]
    assert ("test", "failed") in steps and steps[-1] == ("finish", "ok")
    assert all("rotated-value" not in json.dumps(r) for r in audit)


EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "rotate-api-key.sh"


def test_the_example_command_rotator_rotates_an_api_key(env: AgentEnv, tmp_path: Path) -> None:
    keys = tmp_path / "service" / "keys"
    env.put("app/api-key", "first-key")
    env_param = "env=" + json.dumps({"API_KEYS_FILE": str(keys)})
    params = ["--param", f"command={EXAMPLE}", "--param", env_param]
    code, _, err = env.cli("rotate", "app/api-key", "--rotator", "command", *params)
    assert code == 1 and "stopped (transient) at step set" in err  # exit 75: no directory
    keys.parent.mkdir()
    code, out, err = env.cli("rotate", "app/api-key", "--rotator", "command", *params)
    assert code == 0, err
    assert "(resumed)" in out
    _, value, _ = env.cli("get", "app/api-key")
    assert len(value) == 43 and value != "first-key"

    assert keys.read_text().split() == [hashlib.sha256(value.encode()).hexdigest()]
