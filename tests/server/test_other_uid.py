"""A real client running as another uid (nobody): denied, audited, then allowed by a rule.

The client is a child process that drops to ``nobody`` (``user=``/``group=``
of subprocess, i.e. setgid/setgroups/setuid before exec) and speaks HTTP on
the socket with the standard library only.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from agent.audit import AuditLog, NullAudit
from agent.config import load_config
from agent.daemon import Daemon
from tests.agentenv import AgentEnv
from tests.server.conftest import ServeUnix, World

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a client as another uid"),
]

NOBODY = 65534
# Raw HTTP/1.0 on the socket: the server closes after answering.
CLIENT = """
import socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.connect(sys.argv[1])
s.sendall(("GET " + sys.argv[2] + " HTTP/1.0\\r\\nHost: localhost\\r\\n\\r\\n").encode())
data = b""
while True:
    chunk = s.recv(65536)
    if not chunk:
        break
    data += chunk
sys.stdout.buffer.write(data)
"""


def _runs_as_nobody(python: str) -> bool:
    try:
        done = subprocess.run(
            [python, "-c", "pass"],
            user=NOBODY,
            group=NOBODY,
            extra_groups=[],
            cwd="/",
            env={},
            capture_output=True,
            timeout=30,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return False
    return done.returncode == 0


@pytest.fixture(scope="module")
def nobody_python() -> str:
    """A Python interpreter the nobody user may execute (the venv's may live under /root)."""
    for candidate in (sys.executable, "/usr/bin/python3", shutil.which("python3")):
        if candidate and _runs_as_nobody(candidate):
            return candidate
    pytest.skip("no Python interpreter executable by nobody")


async def as_nobody(
    python: str, socket_path: Path, path: str, *, groups: list[int] | None = None
) -> tuple[int, bytes]:
    """GET ``path`` on the socket from a process running as nobody; (status, body)."""
    proc = await asyncio.create_subprocess_exec(
        python,
        "-c",
        CLIENT,
        str(socket_path),
        path,
        user=NOBODY,
        group=NOBODY,
        extra_groups=groups or [],
        cwd="/",
        env={},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0, err.decode()
    head, _, body = out.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


def records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@contextlib.asynccontextmanager
async def running(daemon: Daemon, socket_path: Path) -> AsyncIterator[None]:
    task = asyncio.create_task(daemon.run())
    try:
        async with aiohttp.ClientSession(
            connector=aiohttp.UnixConnector(path=str(socket_path))
        ) as session:
            for _ in range(500):
                assert not task.done(), "the agent exited before it was ready"
                with contextlib.suppress(aiohttp.ClientError, OSError):
                    async with session.get("http://localhost/readyz") as resp:
                        if resp.status == 200:
                            break
                await asyncio.sleep(0.02)
        yield
    finally:
        daemon.shutdown.set()
        await asyncio.wait_for(task, 15)


async def test_another_uid_is_denied_and_audited_then_allowed_after_a_reload(
    env: AgentEnv, nobody_python: str
) -> None:
    audit_path = env.dir / "audit.log"
    env.configure(
        listen={"socket": "./agent.sock", "socket_mode": "0666"},
        access=[{"secrets": ["*"], "uids": [0]}],
        audit={"path": "./audit.log"},
    )
    os.chmod(env.dir, 0o711)  # traversable by nobody, not listable
    env.put("app/db", "value-for-nobody")
    daemon = Daemon(env.config())
    own_audit = isinstance(daemon.state.audit, NullAudit)  # until the daemon wires audit itself
    if own_audit:
        daemon.state.audit = AuditLog(audit_path, metrics=daemon.metrics)
    try:
        async with running(daemon, env.socket):
            status, body = await as_nobody(nobody_python, env.socket, "/v1/secrets/app/db")
            assert status == 403
            assert json.loads(body)["error"]["code"] == "access_denied"
            assert b"value-for-nobody" not in body
            denied = records(audit_path)[-1]
            assert denied["event"] == "denied" and denied["secret"] == "app/db"
            assert denied["caller"]["uid"] == NOBODY and denied["caller"]["gid"] == NOBODY
            assert denied["caller"]["exe"] == os.path.realpath(nobody_python)
            assert denied["reason"].startswith("no rule matches this caller and secret")

            # A missing secret looks the same to nobody.
            status, missing = await as_nobody(nobody_python, env.socket, "/v1/secrets/app/zz")
            assert status == 403
            assert missing.replace(b"app/zz", b"N") == body.replace(b"app/db", b"N")

            env.configure(
                access=[
                    {"secrets": ["*"], "uids": [0]},
                    {"secrets": ["app/*"], "uids": [NOBODY]},
                ]
            )
            daemon.apply(load_config(env.config_path))
            status, body = await as_nobody(
                nobody_python, env.socket, "/v1/secrets/app/db?format=raw"
            )
            assert (status, body) == (200, b"value-for-nobody")
            # The config watch may audit its own reload of the same file after
            # the read (seen 1 run in 10): take the last read record.
            read = [r for r in records(audit_path) if r["event"] == "read"][-1]
            assert (read["event"], read["caller"]["uid"], read["reason"]) == (
                "read",
                NOBODY,
                "access[1]",
            )
    finally:
        if own_audit:
            await daemon.state.audit.aclose()


@pytest.mark.parametrize(
    ("rule", "groups", "allowed"),
    [
        ({"gids": [NOBODY]}, [], True),
        ({"gids": [4242]}, [4242], True),
        ({"gids": [4242]}, [], False),
        ({"uids": [NOBODY], "exe": ["/nonexistent/*"]}, [], False),
        ({"uids": [NOBODY], "exe": ["EXE"]}, [], True),
    ],
    ids=["primary-gid", "supplementary-gid", "other-gid", "exe-mismatch", "exe-match"],
)
async def test_gid_and_exe_rules_apply_to_real_peers(
    world: World,
    serve_unix: ServeUnix,
    nobody_python: str,
    rule: dict[str, Any],
    groups: list[int],
    allowed: bool,
) -> None:
    exe = os.path.realpath(nobody_python)
    rule = {k: [exe if p == "EXE" else p for p in v] for k, v in rule.items()}
    world.set_rules([{"secrets": ["app/*"], **rule}])
    await world.put("app/db", "v")
    api = await serve_unix(mode=0o666)
    assert api.socket is not None
    status, _ = await as_nobody(nobody_python, api.socket, "/v1/secrets/app/db", groups=groups)
    assert status == (200 if allowed else 403)
    (record,) = world.records()
    assert record["caller"]["uid"] == NOBODY
    assert record["event"] == ("read" if allowed else "denied")
