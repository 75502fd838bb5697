"""SIGKILL at random points during ``put``, ``reencrypt``, reads and renders.

Each round starts a real ``secrets-agent`` process and kills it with SIGKILL
after a random delay (seeded; the seed is printed). Afterwards every version
in the store must decrypt to a value that was written (0 lost or corrupted
versions), every stage map must parse and name existing versions, a rendered
file must hold exactly one written value (0 torn files), and every read that
was answered must have answered a written value.

Rounds: 2 per scenario in the reduced form, times the suite's scale.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from agent.client import ClientError, SecretsClient
from tests.agentenv import AgentEnv
from tests.reliability.conftest import TALLY, scaled
from tests.reliability.test_faults import check_store
from tests.render.conftest import tmpfs  # noqa: F401 - a fixture

pytestmark = pytest.mark.timeout(900)
SEED = int(os.environ.get("RELIABILITY_SEED") or time.time())
ROUNDS = scaled(2)


def _spawn(env: AgentEnv, *args: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "agent", "-c", str(env.config_path), *args],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def _kill(proc: subprocess.Popen[bytes]) -> bool:
    """SIGKILL ``proc`` (by its pid); return whether it was still running."""
    alive = proc.poll() is None
    if alive:
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait(30)
    return alive


def _no_temp_files_visible(store: Path) -> None:
    """Interrupted writes may leave temp files; none may look like a version or stage map."""
    for path in store.rglob("*"):
        if path.is_file() and path.parent.name == "versions":
            assert path.suffix == ".json" or path.name.startswith("."), path


def _tally(scenario: str, kills: int, versions: int) -> None:
    TALLY["fault_scenarios_survived"] += 1
    TALLY[f"scenario:SIGKILL during {scenario}"] += 1
    TALLY["sigkills"] += kills
    TALLY["versions_checked"] += versions


def test_sigkill_during_put(env: AgentEnv) -> None:
    rng = random.Random(SEED)
    print(f"seed {SEED}")
    env.put("db", "v0")
    written = {b"v0"}
    kills = 0
    for i in range(ROUNDS):
        value = f"v{i + 1}-" + "x" * rng.randint(0, 20_000)
        written.add(value.encode())
        proc = _spawn(env, "put", "db", "--value", value)
        time.sleep(rng.uniform(0.2, 2.0))  # start-up is most of it: kills land all over
        kills += _kill(proc)
    _no_temp_files_visible(env.dir / "store")
    versions = asyncio.run(check_store(env.config(), {"db": written}))
    env.put("db", "after")  # the store still takes writes
    _tally("put", kills, versions)


def test_sigkill_during_reencrypt(env: AgentEnv) -> None:
    rng = random.Random(SEED + 1)
    written: dict[str, set[bytes]] = {}
    for i in range(8):
        for v in range(2):
            value = f"s{i}-v{v}"
            env.put(f"app/s{i}", value)
            written.setdefault(f"app/s{i}", set()).add(value.encode())
    kills = 0
    for _ in range(ROUNDS):
        code, _, err = env.cli("keys", "rotate")  # so reencrypt has work to do
        assert code == 0, err
        proc = _spawn(env, "reencrypt", "--store-wide")
        time.sleep(rng.uniform(0.2, 2.5))
        kills += _kill(proc)
    _no_temp_files_visible(env.dir / "store")
    versions = asyncio.run(check_store(env.config(), written))
    code, _, err = env.cli("reencrypt", "--store-wide")  # and it completes afterwards
    assert code == 0, err
    assert asyncio.run(check_store(env.config(), written)) == versions
    _tally("reencrypt", kills, versions)


def _wait_ready(client: SecretsClient, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        assert proc.poll() is None, "the agent exited"
        try:
            client.get("db")
            return
        except (ClientError, OSError):
            time.sleep(0.05)
    raise AssertionError("the agent did not start")


def test_sigkill_during_reads_and_renders(env: AgentEnv, tmpfs: Path) -> None:  # noqa: F811
    rng = random.Random(SEED + 2)
    dest = tmpfs / "db.txt"
    env.put("db", "v0")
    env.configure(
        templates=[{"destination": str(dest), "secret": "db"}],
        refresh={"interval": "500ms", "backoff_initial": "100ms", "backoff_max": "500ms"},
    )
    written = {b"v0"}
    client = SecretsClient(env.socket, timeout=2)
    kills = reads = 0
    for i in range(ROUNDS):
        proc = _spawn(env, "run")
        try:
            _wait_ready(client, proc)
            value = f"v{i + 1}-" + "y" * rng.randint(0, 50_000)
            written.add(value.encode())
            env.put("db", value)  # a rotation: the agent reads, renders, serves it
            deadline = time.monotonic() + rng.uniform(0.0, 1.0)
            while time.monotonic() < deadline:
                try:
                    got = client.get("db")
                except (ClientError, OSError):
                    continue
                reads += 1
                assert got.encode() in written
        finally:
            kills += _kill(proc)
        content = dest.read_bytes()
        assert content in written, f"torn or unknown rendered file ({len(content)} bytes)"
    versions = asyncio.run(check_store(env.config(), {"db": written}))
    TALLY["reads_during_sigkill_rounds"] += reads
    _tally("reads and renders", kills, versions)
