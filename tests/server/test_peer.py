"""Caller identity once per connection; cached access decisions; exec re-checks ``exe``."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
from pathlib import Path

from agent.server.access import AccessPolicy
from agent.server.peer import Caller
from tests.server.conftest import ServeUnix, World
from tests.server.test_access import policy

# One keep-alive connection: a read, then exec of argv[2] (the same script) keeping the socket.
CLIENT = """
import os, socket, sys

def get(s):
    s.sendall(b"GET /v1/secrets/app/db?format=raw HTTP/1.1\\r\\nHost: localhost\\r\\n\\r\\n")
    data = b""
    while b"\\r\\n\\r\\n" not in data:
        data += s.recv(65536)
    head, _, body = data.partition(b"\\r\\n\\r\\n")
    lines = head.split(b"\\r\\n")
    length = int([h for h in lines if h.lower().startswith(b"content-length")][0].split(b":")[1])
    while len(body) < length:
        body += s.recv(65536)
    return head.split()[1].decode()

if sys.argv[1] == "first":
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(sys.argv[3])
    print(get(s), flush=True)
    os.set_inheritable(s.fileno(), True)
    os.execv(sys.argv[2], [sys.argv[2], "-c", sys.argv[4], "second", str(s.fileno()), sys.argv[3]])
else:
    kept = socket.socket(fileno=int(sys.argv[2]))
    fresh = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    fresh.connect(sys.argv[3])
    print(get(kept), get(fresh), flush=True)
"""


async def test_a_cached_decision_follows_a_config_reload_at_once(
    world: World, serve_unix: ServeUnix
) -> None:
    await world.put("app/db", "v")
    api = await serve_unix()
    for _ in range(3):  # the decision is cached now, on one keep-alive connection
        assert (await api.get("/v1/secrets/app/db")).status == 200
    world.set_rules([{"secrets": ["other/*"], "uids": [os.getuid()]}])
    assert (await api.get("/v1/secrets/app/db")).status == 403
    world.set_rules([{"secrets": ["app/*"], "uids": [os.getuid()], "stages": ["PENDING"]}])
    assert (await api.get("/v1/secrets/app/db")).status == 403
    world.set_rules([{"secrets": ["app/*"], "uids": [os.getuid()]}])
    assert (await api.get("/v1/secrets/app/db")).status == 200
    assert [r["event"] for r in world.records()] == ["read"] * 3 + ["denied"] * 2 + ["read"]


async def test_a_caller_that_execs_another_binary_is_checked_as_that_binary(
    world: World, serve_unix: ServeUnix, tmp_path: Path
) -> None:
    """Same pid, same connection (inherited across exec) or a new one: ``exe`` is re-read."""
    python = os.path.realpath(sys.executable)
    other = tmp_path / "other-python"
    shutil.copy2(python, other)
    world.set_rules([{"secrets": ["app/*"], "uids": [os.getuid()], "exe": [python]}])
    await world.put("app/db", "v")
    api = await serve_unix()
    assert api.socket is not None
    proc = await asyncio.create_subprocess_exec(
        python,
        "-c",
        CLIENT,
        "first",
        str(other),
        str(api.socket),
        CLIENT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()
    assert out.decode().split() == ["200", "403", "403"]
    # Denials are aggregated: the second (same caller, exe, secret, reason) is a count.
    await world.audit.aclose()
    allowed, kept, fresh = world.records()
    assert allowed["caller"]["exe"] == python and allowed["event"] == "read"
    assert kept["caller"]["pid"] == allowed["caller"]["pid"] == fresh["caller"]["pid"]
    assert kept["caller"]["exe"] == fresh["caller"]["exe"] == str(other)
    assert kept["event"] == fresh["event"] == "denied"
    assert "count" not in kept and fresh["count"] == 1


def test_decisions_are_remembered_per_policy_and_ignore_the_pid() -> None:
    p = policy({"secrets": ["app/*"], "uids": [1000]})
    a = Caller("unix", uid=1000, gid=1000, pid=1, groups=frozenset({1000}))
    b = Caller("unix", uid=1000, gid=1000, pid=2, groups=frozenset({1000}))
    first = p.check(a, "app/x", ["CURRENT"])
    assert first.allowed and p.check(b, "app/x", ["CURRENT"]) is first
    assert not p.check(a, "other").allowed
    assert not AccessPolicy([]).check(a, "app/x", ["CURRENT"]).allowed


def test_groups_and_exe_are_needed_only_when_some_rule_names_them() -> None:
    assert not policy({"secrets": ["*"], "uids": [1]}).needs_groups
    assert not policy({"secrets": ["*"], "uids": [1]}).needs_exe
    assert policy({"secrets": ["*"], "gids": [1]}).needs_groups
    assert policy({"secrets": ["*"], "uids": [1], "exe": ["/x"]}).needs_exe
