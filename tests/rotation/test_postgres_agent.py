"""The postgres rotator end to end: the engine, the CLI and a running agent, on a real PostgreSQL.

* ``secrets-agent rotate NAME`` rotates a database secret with no parameters;
* PostgreSQL stopped mid-rotation leaves CURRENT working and the next run
  resumes the same PENDING version;
* an app with an asyncpg pool that reads its credentials through the agent's
  socket keeps working across 20 scheduled rotations with 0 failed queries.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import re
import secrets
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import asyncpg
import pytest
import yaml

from agent.client import AsyncSecretsClient
from tests.agentenv import AgentEnv
from tests.servers import PostgresServer

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

ROOT = Path(__file__).resolve().parents[2]
ROTATIONS = 20


def _load_example() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "postgres_pool_example", ROOT / "examples" / "postgres_pool.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def app_role(postgres_server: PostgresServer) -> Iterator[dict[str, Any]]:
    """A fresh login role with a table it may read; its secret (AWS shape) is yielded."""
    name = f"app_{uuid.uuid4().hex[:8]}"
    password = secrets.token_urlsafe(18)
    postgres_server.psql(
        f"CREATE ROLE {name} LOGIN PASSWORD '{password}'; "
        f"CREATE TABLE t_{name} (x int); INSERT INTO t_{name} VALUES (42); "
        f"GRANT SELECT ON t_{name} TO {name}"
    )
    yield {
        "engine": "postgres",
        "host": postgres_server.host,
        "port": postgres_server.port,
        "username": name,
        "password": password,
        "dbname": postgres_server.dbname,
    }
    if not postgres_server.running:
        postgres_server.start()
    postgres_server.psql(
        f"DROP TABLE IF EXISTS t_{name}; DROP ROLE IF EXISTS {name}_clone; DROP ROLE {name}"
    )


async def logs_in(creds: dict[str, Any]) -> bool:
    try:
        conn = await asyncpg.connect(
            host=creds["host"],
            port=creds["port"],
            user=creds["username"],
            password=creds["password"],
            database=creds["dbname"],
            timeout=10,
        )
    except asyncpg.InvalidAuthorizationSpecificationError:
        return False
    try:
        return bool(await conn.fetchval("SELECT 1") == 1)
    finally:
        await conn.close()


def _get(env: AgentEnv, name: str, *args: str) -> dict[str, Any]:
    code, out, err = env.cli("get", name, *args)
    assert code == 0, err
    return dict(json.loads(out))


def _describe(env: AgentEnv, name: str) -> dict[str, Any]:
    code, out, err = env.cli("describe", name, "--json")
    assert code == 0, err
    return dict(json.loads(out))


def _stage_version(env: AgentEnv, name: str, stage: str) -> str | None:
    version = _describe(env, name)["stages"].get(stage)
    return None if version is None else str(version)


async def test_cli_rotate_needs_no_params_and_leaves_no_value_in_output(
    env: AgentEnv, app_role: dict[str, Any]
) -> None:
    env.put("prod/db", json.dumps(app_role), "--json")
    # No rule in the config: the rotator is named on the command line, with no params.
    code, out, err = env.cli("rotate", "prod/db", "--rotator", "postgres")
    assert code == 0, err
    new = _get(env, "prod/db")
    assert new["username"] == app_role["username"] and new["password"] != app_role["password"]
    assert await logs_in(new) and not await logs_in(app_role)
    assert _get(env, "prod/db", "--stage", "PREVIOUS")["password"] == app_role["password"]
    for value in (new["password"], app_role["password"]):
        assert value not in out + err
    audit = (env.dir / "audit.log").read_text() if (env.dir / "audit.log").exists() else ""
    assert new["password"] not in audit and app_role["password"] not in audit


async def test_postgres_stopped_mid_rotation_keeps_current_and_the_next_run_completes(
    env: AgentEnv, app_role: dict[str, Any], postgres_server: PostgresServer
) -> None:
    env.configure(
        rotation=[
            {
                "secret": "prod/db",
                "every": "30d",
                "rotator": "postgres",
                "params": {"connect_timeout": "3s"},
            }
        ]
    )
    env.put("prod/db", json.dumps(app_role), "--json")
    current = _stage_version(env, "prod/db", "CURRENT")
    await asyncio.to_thread(postgres_server.stop)
    try:
        code, out, err = env.cli("rotate", "prod/db")
        assert code != 0
        assert app_role["password"] not in out + err
        # CURRENT untouched; the new value waits as PENDING.
        assert _stage_version(env, "prod/db", "CURRENT") == current
        pending = _stage_version(env, "prod/db", "PENDING")
        assert pending is not None and pending != current
    finally:
        await asyncio.to_thread(postgres_server.start)
    assert await logs_in(app_role), "CURRENT must still log in after the failed run"
    code, out, err = env.cli("rotate", "prod/db")
    assert code == 0, err
    assert _stage_version(env, "prod/db", "CURRENT") == pending, "resumed, not duplicated"
    assert _stage_version(env, "prod/db", "PENDING") is None
    new = _get(env, "prod/db")
    assert await logs_in(new) and not await logs_in(app_role)


async def test_postgres_stopped_during_set_keeps_current_and_the_next_run_completes(
    env: AgentEnv, app_role: dict[str, Any], postgres_server: PostgresServer
) -> None:
    """The rotate command's ALTER ROLE is blocked on a held row when PostgreSQL stops."""
    env.configure(
        rotation=[
            {
                "secret": "prod/db",
                "every": "30d",
                "rotator": "postgres",
                "params": {"connect_timeout": "20s"},
            }
        ]
    )
    env.put("prod/db", json.dumps(app_role), "--json")
    current = _stage_version(env, "prod/db", "CURRENT")
    holder = await asyncpg.connect(postgres_server.dsn, timeout=10)
    run: asyncio.Task[tuple[int, str, str]] | None = None
    try:
        await holder.execute("BEGIN")
        await holder.execute(f"ALTER ROLE {app_role['username']} CONNECTION LIMIT 50")
        run = asyncio.create_task(asyncio.to_thread(env.cli, "rotate", "prod/db"))
        await _wait_for_blocked_alter(postgres_server, app_role["username"])
        await asyncio.to_thread(postgres_server.stop)
        code, out, err = await asyncio.wait_for(run, 60)
        assert code != 0 and "set" in err
        assert app_role["password"] not in out + err
    finally:
        with contextlib.suppress(Exception):
            await holder.close(timeout=2)
        if not postgres_server.running:
            await asyncio.to_thread(postgres_server.start)
        if run is not None and not run.done():
            await asyncio.wait_for(run, 60)
    assert _stage_version(env, "prod/db", "CURRENT") == current
    pending = _stage_version(env, "prod/db", "PENDING")
    assert pending is not None
    pending_value = _get(env, "prod/db", "--stage", "PENDING")
    assert await logs_in(app_role), "the interrupted ALTER ROLE must not have committed"
    assert not await logs_in(pending_value)
    code, _, err = env.cli("rotate", "prod/db")
    assert code == 0, err
    assert _stage_version(env, "prod/db", "CURRENT") == pending, "resumed, not duplicated"
    assert await logs_in(_get(env, "prod/db")) and not await logs_in(app_role)


async def _wait_for_blocked_alter(server: PostgresServer, role: str) -> None:
    sql = (
        "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'secrets-agent' "
        f"AND wait_event_type = 'Lock' AND usename = '{role}'"
    )
    for _ in range(300):
        if (await asyncio.to_thread(server.psql, sql)).strip() == "1":
            return
        await asyncio.sleep(0.05)
    raise AssertionError("the rotator's ALTER ROLE never blocked on the held row")


@contextlib.contextmanager
def _agent_process(env: AgentEnv) -> Iterator[subprocess.Popen[bytes]]:
    log = (env.dir / "agent.out").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "agent", "-c", str(env.config_path), "run"],
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=ROOT,
    )
    try:
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        log.close()


async def _wait_ready(client: AsyncSecretsClient, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        assert proc.poll() is None, "the agent exited during start-up"
        with contextlib.suppress(Exception):
            await client.get_json("prod/db")
            return
        await asyncio.sleep(0.1)
    raise AssertionError("the agent did not serve prod/db in time")


async def test_app_pool_keeps_working_across_20_scheduled_rotations(
    env: AgentEnv, app_role: dict[str, Any], postgres_server: PostgresServer
) -> None:
    example = _load_example()
    admin = {"username": postgres_server.admin_user, "password": postgres_server.admin_password}
    env.put("prod/db-admin", json.dumps(admin), "--json")
    env.put("prod/db", json.dumps(app_role), "--json")
    env.configure(
        secrets=["prod/db"],
        rotation=[
            {
                "secret": "prod/db",
                "every": "1s",
                "rotator": "postgres",
                "params": {"strategy": "alternating-users", "admin_secret": "prod/db-admin"},
            }
        ],
    )
    table = f"t_{app_role['username']}"
    queries = failures = connections = 0
    errors: list[str] = []
    users: list[str] = []
    versions: list[str] = []

    async with AsyncSecretsClient(env.socket, timeout=5) as client:

        async def counting_connect(*args: Any, **kwargs: Any) -> asyncpg.Connection:
            nonlocal connections
            connections += 1
            conn: asyncpg.Connection = await example.connect_with_agent(client, "prod/db", **kwargs)
            return conn

        async def worker(pool: asyncpg.Pool, stop: asyncio.Event) -> None:
            nonlocal queries, failures
            while not stop.is_set():
                try:
                    got = await pool.fetchval(f"SELECT x FROM {table}")
                    assert got == 42
                except Exception as exc:  # every failure counts, whatever it is
                    failures += 1
                    errors.append(f"{type(exc).__name__}: {exc}"[:200])
                queries += 1
                await asyncio.sleep(0.005)

        with _agent_process(env) as proc:
            await _wait_ready(client, proc)
            # max_queries recycles connections, so new logins happen all along.
            async with asyncpg.create_pool(
                connect=counting_connect, min_size=2, max_size=4, max_queries=40
            ) as pool:
                stop = asyncio.Event()
                tasks = [asyncio.create_task(worker(pool, stop)) for _ in range(4)]
                try:
                    deadline = time.monotonic() + 75
                    while len(versions) < ROTATIONS + 1 and time.monotonic() < deadline:
                        assert proc.poll() is None, "the agent exited"
                        doc = await client.describe("prod/db")
                        if not versions or versions[-1] != doc["version_id"]:
                            versions.append(doc["version_id"])
                            users.append(json.loads(doc["value"])["username"])
                        await asyncio.sleep(0.05)
                finally:
                    stop.set()
                    await asyncio.gather(*tasks)
    out = (env.dir / "agent.out").read_text(errors="replace")
    rotations = len(versions) - 1
    assert rotations >= ROTATIONS, f"only {rotations} rotations seen; agent log:\n{out[-3000:]}"
    assert failures == 0, f"{failures} of {queries} queries failed: {errors[:5]}"
    assert connections > ROTATIONS, "the pool must have logged in anew across rotations"
    base, clone = app_role["username"], f"{app_role['username']}_clone"
    assert set(users) == {base, clone}
    # No value in the agent's own output.
    assert app_role["password"] not in out and postgres_server.admin_password not in out
    print(
        f"\n{rotations} rotations, {queries} queries, {failures} failed, "
        f"{connections} new connections"
    )


def _doc_blocks(lang: str) -> list[str]:
    """The ``lang`` code blocks of docs/rotation.md's PostgreSQL worked example, in order."""
    text = (ROOT / "docs" / "rotation.md").read_text()
    example = text[text.index("### Worked example") :]
    return re.findall(rf"```{lang}\n(.*?)```", example, flags=re.DOTALL)


async def test_docs_worked_example_works_as_written(
    env: AgentEnv, postgres_server: PostgresServer
) -> None:
    """docs/rotation.md#worked-example, run step by step (role names made unique)."""
    app, rotator = f"app_{uuid.uuid4().hex[:8]}", f"rot_{uuid.uuid4().hex[:8]}"

    def here(text: str) -> str:
        text = re.sub(r"\bapp\b", app, text).replace("secrets_rotator", rotator)
        text = text.replace("appdb", postgres_server.dbname).replace("db.internal", "127.0.0.1")
        return text.replace('"port": 5432', f'"port": {postgres_server.port}')

    sql, puts, commands = here(_doc_blocks("sql")[0]), _doc_blocks("sh")[0], _doc_blocks("sh")[1]
    postgres_server.psql(sql)
    try:
        for name, body in re.findall(r"put (\S+) --json <<'EOF'\n(.*?)\nEOF", puts, re.DOTALL):
            env.put(name, here(body), "--json")
        env.configure(**yaml.safe_load(here(_doc_blocks("yaml")[0])))
        initial = _get(env, "prod/db")
        outputs = []
        for line in commands.splitlines():
            argv = line.split("#")[0].split()
            assert argv[0] == "secrets-agent"
            code, out, err = env.cli(*argv[1:])
            assert code == 0, f"{line}: {err}"
            outputs.append(out)
        assert outputs[-1].strip() == f"{app}_clone"
        assert await logs_in(_get(env, "prod/db")) and await logs_in(initial)
        # The next rotation gives app a new password: only now does the initial one stop.
        assert env.cli("rotate", "prod/db")[0] == 0
        assert _get(env, "prod/db")["username"] == app
        assert await logs_in(_get(env, "prod/db", "--stage", "PREVIOUS"))
        assert not await logs_in(initial)
    finally:
        postgres_server.psql(
            f"DROP OWNED BY {app}, {rotator}; DROP ROLE IF EXISTS {app}_clone; "
            f"DROP ROLE {app}; DROP ROLE {rotator}"
        )
