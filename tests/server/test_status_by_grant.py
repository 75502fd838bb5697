"""``/v1/status`` by grant, and no value or absolute path in what callers see (issue 12).

A real second uid (nobody) with no grant sees health only; a granted caller
sees only its secrets and templates; a template error holds no fragment of
the value the template touched (finding 3); error bodies name no absolute
path (finding 5).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.daemon import Daemon
from tests.agentenv import AgentEnv
from tests.server.test_other_uid import NOBODY, as_nobody, nobody_python, running  # noqa: F401

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a client as another uid"),
]

PASSWORD = "Xk7#mQ2$vL9@pR4&tY6*wZ1!"  # 24 characters


@pytest.fixture
def shm_dir() -> Iterator[Path]:
    base = Path(tempfile.mkdtemp(prefix="sa-st-", dir="/dev/shm"))
    try:
        yield base
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _fragments(value: str) -> list[str]:
    return [value[i : i + 4] for i in range(len(value) - 3)]


async def test_status_shows_each_caller_only_what_its_rules_allow(
    env: AgentEnv,
    nobody_python: str,  # noqa: F811 - the fixture imported above
    shm_dir: Path,
) -> None:
    env.configure(
        listen={"socket": "./agent.sock", "socket_mode": "0666"},
        audit={"path": str(env.dir / "audit.log")},
        access=[
            {"secrets": ["*"], "uids": [0]},
            {"secrets": ["public/*"], "uids": [NOBODY]},
        ],
        templates=[
            {
                "destination": str(shm_dir / "q.conf"),
                "format": "template",
                "secrets": ["app/q"],
                "template": "{{ secrets['app/q'][secrets['app/q'].password[1:]] }}",
            },
            {"destination": str(shm_dir / "p"), "secret": "public/p"},
        ],
    )
    os.chmod(env.dir, 0o711)
    env.put("app/q", json.dumps({"password": PASSWORD}))
    env.put("public/p", "public-value")
    daemon = Daemon(env.config())
    async with running(daemon, env.socket):
        # Root, granted everything: sees app/q and the failed template, without the value.
        status, _, body = await _get(env, "/v1/status")
        doc = json.loads(body)
        assert status == 200 and {s["name"] for s in doc["secrets"]} == {"app/q", "public/p"}
        failed = next(t for t in doc["templates"] if t["secrets"] == ["app/q"])
        assert (
            "q.conf): template error: undefined name, key or attribute, line 1" in failed["error"]
        )
        assert not any(f in body.decode() for f in _fragments(PASSWORD))

        # nobody, granted public/* only: its secret and template, nothing of app/q.
        status, body = await as_nobody(nobody_python, env.socket, "/v1/status")
        doc = json.loads(body)
        assert status == 200
        assert [s["name"] for s in doc["secrets"]] == ["public/p"]
        assert [t["secrets"] for t in doc["templates"]] == [["public/p"]]
        assert b"app/q" not in body and b"q.conf" not in body
        # Agent-wide parts (audit, keys) name no absolute path either.
        assert str(env.dir).encode() not in body, body


async def test_a_caller_with_no_grant_gets_health_only(
    env: AgentEnv,
    nobody_python: str,  # noqa: F811 - the fixture imported above
    shm_dir: Path,
) -> None:
    env.configure(
        listen={"socket": "./agent.sock", "socket_mode": "0666"},
        access=[{"secrets": ["*"], "uids": [0]}],
        templates=[{"destination": str(shm_dir / "p"), "secret": "app/p"}],
    )
    os.chmod(env.dir, 0o711)
    env.put("app/p", "value")
    async with running(Daemon(env.config()), env.socket):
        status, body = await as_nobody(nobody_python, env.socket, "/v1/status")
        assert (status, json.loads(body)) == (200, {"ready": True})


async def test_error_bodies_name_no_absolute_path(env: AgentEnv) -> None:
    env.configure(access=[{"secrets": ["*"], "uids": [0]}], secrets=["ok"])
    env.put("ok", "fine")
    env.put("broken", "x")
    stages = env.dir / "store" / "secrets" / "broken" / "stages.json"
    stages.write_text("not json")
    async with env.running() as agent:
        status, _, body = await agent.get("/v1/secrets/broken")
        assert status == 503
        message = json.loads(body)["error"]["message"]
        assert "stage map of secret 'broken'" in message and "…/stages.json" in message
        assert str(env.dir) not in body.decode() and "/store/" not in body.decode()


async def _get(env: AgentEnv, path: str) -> tuple[int, dict[str, str], bytes]:
    import aiohttp

    async with (
        aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=str(env.socket))) as session,
        session.get(f"http://localhost{path}") as resp,
    ):
        return resp.status, dict(resp.headers), await resp.read()
