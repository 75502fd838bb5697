"""The postgres rotator against a real PostgreSQL (the ``postgres_server`` fixture).

These tests drive the rotator through the Rotator protocol the way the engine
does (create, set, test, then finish as a stage move in memory), so each step's
effect on the server can be checked in between.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import pytest

from agent.errors import BackendUnavailable, SecretNotFound
from agent.registry import load_backend
from agent.rotation.base import ROTATORS, RotationContext, RotationFailed
from agent.rotation.postgres import AuthenticationFailed, PostgresRotator
from agent.types import SecretValue
from tests.servers import PostgresServer, free_port

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]


@dataclass
class Role:
    """A login role made for one test, with a table only it may read."""

    server: PostgresServer
    name: str
    password: str
    table: str

    def secret(self, **extra: Any) -> dict[str, Any]:
        """The role's database secret, in the AWS shape."""
        return {
            "engine": "postgres",
            "host": self.server.host,
            "port": self.server.port,
            "username": self.name,
            "password": self.password,
            "dbname": self.server.dbname,
            **extra,
        }


@pytest.fixture
def pg_role(postgres_server: PostgresServer) -> Iterator[Role]:
    """A fresh role ``app_<hex>`` (and, on teardown, its clone dropped too)."""
    name = f"app_{uuid.uuid4().hex[:8]}"
    role = Role(postgres_server, name, secrets.token_urlsafe(18), f"t_{name}")
    postgres_server.psql(
        f"CREATE ROLE {name} LOGIN PASSWORD '{role.password}'; "
        f"CREATE TABLE {role.table} (x int); INSERT INTO {role.table} VALUES (42); "
        f"GRANT SELECT ON {role.table} TO {name}"
    )
    yield role
    if not postgres_server.running:
        postgres_server.start()
    postgres_server.psql(
        f"DROP TABLE IF EXISTS {role.table}; DROP ROLE IF EXISTS {name}_clone; "
        f"DROP ROLE IF EXISTS {name}"
    )


@dataclass
class Rotation:
    """One secret and its stages in memory, rotated through the protocol as the engine does."""

    rotator: PostgresRotator
    current: dict[str, Any]
    others: dict[str, dict[str, Any]] = field(default_factory=dict)
    name: str = "prod/db"
    pending: dict[str, Any] | None = None
    previous: dict[str, Any] | None = None
    token: str = ""

    def ctx(self) -> RotationContext:
        async def read_secret(name: str) -> SecretValue:
            if name not in self.others:
                raise SecretNotFound(f"no secret {name!r}")
            return _value(self.others[name])

        return RotationContext(
            name=self.name,
            token=self.token,
            current=_value(self.current),
            current_version="v-current",
            pending=None if self.pending is None else _value(self.pending),
            read_secret=read_secret,
        )

    async def create(self) -> dict[str, Any]:
        self.token = uuid.uuid4().hex
        self.pending = json.loads(await self.rotator.create(self.ctx()))
        return self.pending

    async def set(self) -> None:
        await self.rotator.set(self.ctx())

    async def test(self) -> None:
        await self.rotator.test(self.ctx())

    def finish(self) -> None:
        assert self.pending is not None
        self.previous, self.current, self.pending = self.current, self.pending, None

    async def rotate(self) -> None:
        await self.create()
        await self.set()
        await self.test()
        self.finish()


def _value(doc: dict[str, Any]) -> SecretValue:
    return SecretValue(json.dumps(doc).encode())


async def logs_in(creds: dict[str, Any], sql: str = "SELECT 1") -> Any:
    """The result of ``sql`` run as ``creds``, or False when the login is refused."""
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
        return await conn.fetchval(sql)
    finally:
        await conn.close()


@pytest.fixture
async def admin_conn(postgres_server: PostgresServer) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(postgres_server.dsn, timeout=10)
    try:
        yield conn
    finally:
        await conn.close()


def _admin_secret(server: PostgresServer) -> dict[str, Any]:
    return {"username": server.admin_user, "password": server.admin_password}


# --- single user --------------------------------------------------------------------------


async def test_registry_names_the_rotator() -> None:
    assert load_backend(ROTATORS, "postgres", "rotator") is PostgresRotator


async def test_single_user_new_password_logs_in_and_old_does_not(pg_role: Role) -> None:
    rot = Rotation(PostgresRotator({}), pg_role.secret(note="kept"))
    old = dict(rot.current)
    pending = await rot.create()
    assert pending["username"] == pg_role.name and pending["password"] != old["password"]
    assert {k: v for k, v in pending.items() if k != "password"} == {
        k: v for k, v in old.items() if k != "password"
    }
    assert await logs_in(old) == 1, "create must not touch the server"
    await rot.set()
    await rot.test()
    rot.finish()
    assert await logs_in(rot.current) == 1
    assert await logs_in(old) is False


async def test_single_user_set_twice_and_test_after_set_are_harmless(pg_role: Role) -> None:
    rot = Rotation(PostgresRotator({}), pg_role.secret())
    old = dict(rot.current)
    await rot.create()
    await rot.set()
    # CURRENT no longer logs in now: the second set sees PENDING already applied.
    await rot.set()
    await rot.test()
    await rot.test()
    rot.finish()
    assert await logs_in(rot.current) == 1 and await logs_in(old) is False


async def test_single_user_via_admin_secret(pg_role: Role) -> None:
    # CURRENT's password is wrong: only the admin secret can set the new one.
    current = pg_role.secret(password="wrong-" + pg_role.password, admin_secret="prod/db-admin")
    rot = Rotation(
        PostgresRotator({}), current, others={"prod/db-admin": _admin_secret(pg_role.server)}
    )
    await rot.rotate()
    assert rot.current["admin_secret"] == "prod/db-admin"
    assert await logs_in(rot.current) == 1
    assert await logs_in(pg_role.secret()) is False


async def test_admin_secret_from_params_and_missing_admin_secret(pg_role: Role) -> None:
    rot = Rotation(PostgresRotator({"admin_secret": "ops/pg"}), pg_role.secret())
    await rot.create()
    with pytest.raises(RotationFailed, match="admin secret 'ops/pg' not found"):
        await rot.set()
    rot.others["ops/pg"] = _admin_secret(pg_role.server)
    await rot.set()
    await rot.test()
    assert await logs_in(rot.pending or {}) == 1


async def test_password_reaches_the_server_only_as_a_scram_verifier(
    pg_role: Role, postgres_server: PostgresServer
) -> None:
    postgres_server.psql(f"ALTER ROLE {pg_role.name} SET log_statement = 'all'")
    rot = Rotation(PostgresRotator({}), pg_role.secret())
    pending = await rot.create()
    await rot.set()
    log = postgres_server.log_path.read_text(errors="replace")
    assert f'ALTER ROLE "{pg_role.name}" PASSWORD \'SCRAM-SHA-256$4096:' in log
    assert pending["password"] not in log
    stored = postgres_server.psql(
        f"SELECT rolpassword FROM pg_authid WHERE rolname = '{pg_role.name}'"
    )
    assert stored.startswith("SCRAM-SHA-256$4096:")


async def test_auth_failure_is_rotation_failed_without_any_value(pg_role: Role) -> None:
    bad = "wrong-" + pg_role.password
    rot = Rotation(PostgresRotator({}), pg_role.secret(password=bad))
    pending = await rot.create()
    with pytest.raises(AuthenticationFailed) as info:
        await rot.set()
    text = f"{info.value} {info.value!r} {info.value.__cause__!r} {info.value.__context__!r}"
    assert info.value.step == "set"
    assert "neither the CURRENT nor the PENDING password" in text
    for value in (bad, pending["password"], pg_role.password):
        assert value not in text
    with pytest.raises(AuthenticationFailed) as info:
        await rot.test()
    assert pending["password"] not in str(info.value) and info.value.step == "test"


async def test_unreachable_server_is_transient(pg_role: Role) -> None:
    secret = pg_role.secret(port=free_port())
    rot = Rotation(PostgresRotator({"connect_timeout": "2s"}), secret)
    await rot.create()
    with pytest.raises(BackendUnavailable) as info:
        await rot.set()
    assert f"127.0.0.1:{secret['port']}" in str(info.value)
    assert rot.pending is not None and rot.pending["password"] not in str(info.value)


async def test_bad_secret_fails_create_naming_the_field(pg_role: Role) -> None:
    secret = pg_role.secret()
    del secret["host"]
    with pytest.raises(RotationFailed, match="'host'") as info:
        await Rotation(PostgresRotator({}), secret).create()
    assert info.value.step == "create" and pg_role.password not in str(info.value)


# --- alternating users --------------------------------------------------------------------


async def test_alternating_users_both_work_until_the_next_rotation(pg_role: Role) -> None:
    rot = Rotation(
        PostgresRotator({"strategy": "alternating-users", "admin_secret": "prod/db-admin"}),
        pg_role.secret(),
        others={"prod/db-admin": _admin_secret(pg_role.server)},
    )
    clone = f"{pg_role.name}_clone"
    history = [dict(rot.current)]
    for expected_user in (clone, pg_role.name, clone, pg_role.name):
        await rot.rotate()
        history.append(dict(rot.current))
        assert rot.current["username"] == expected_user
        # CURRENT and PREVIOUS both log in, with the base role's privileges.
        assert await logs_in(history[-1]) == 1
        assert await logs_in(history[-2]) == 1
        assert await logs_in(history[-1], f"SELECT x FROM {pg_role.table}") == 42
        # The clone's sessions act as the base role.
        assert await logs_in(history[-1], "SELECT current_user") == pg_role.name
        if len(history) >= 3:
            assert await logs_in(history[-3]) is False, "two rotations ago must be dead"


async def test_alternating_users_with_a_createrole_admin_from_masterarn(
    pg_role: Role, postgres_server: PostgresServer
) -> None:
    """The least-privileged admin the docs describe: CREATEROLE and ADMIN OPTION on the role."""
    admin = {"username": f"rotator_{pg_role.name}", "password": secrets.token_urlsafe(18)}
    postgres_server.psql(
        f"CREATE ROLE {admin['username']} LOGIN CREATEROLE PASSWORD '{admin['password']}'; "
        f"GRANT {pg_role.name} TO {admin['username']} WITH ADMIN OPTION"
    )
    arn = "arn:aws:secretsmanager:us-east-1:000000000000:secret:prod/db-master"
    rot = Rotation(
        PostgresRotator({"strategy": "alternating-users"}),
        pg_role.secret(masterarn=arn),
        others={"prod/db-master": admin},
    )
    try:
        await rot.create()
        await rot.set()
        await rot.set()  # the clone exists now: no second CREATE ROLE, same password
        await rot.test()
        rot.finish()
        assert rot.current["masterarn"] == arn
        assert await logs_in(rot.current) == 1 and await logs_in(rot.previous or {}) == 1
        assert await logs_in(rot.current, f"SELECT x FROM {pg_role.table}") == 42
        await rot.rotate()
        assert rot.current["username"] == pg_role.name
        assert await logs_in(rot.current) == 1 and await logs_in(rot.previous or {}) == 1
    finally:
        postgres_server.psql(
            f"DROP ROLE IF EXISTS {pg_role.name}_clone; DROP ROLE {admin['username']}"
        )


async def test_alternating_users_needs_admin_credentials(pg_role: Role) -> None:
    rot = Rotation(PostgresRotator({"strategy": "alternating-users"}), pg_role.secret())
    await rot.create()
    with pytest.raises(RotationFailed, match="needs admin credentials"):
        await rot.set()


# --- faults: PostgreSQL stopped mid-rotation ----------------------------------------------


async def _restart(server: PostgresServer) -> None:
    if not server.running:
        await asyncio.to_thread(server.start)


async def test_server_stopped_between_create_and_set(
    pg_role: Role, postgres_server: PostgresServer
) -> None:
    rot = Rotation(PostgresRotator({"connect_timeout": "3s"}), pg_role.secret())
    old = dict(rot.current)
    pending = await rot.create()
    await asyncio.to_thread(postgres_server.stop)
    try:
        with pytest.raises(BackendUnavailable):
            await rot.set()
        with pytest.raises(BackendUnavailable):
            await rot.test()
    finally:
        await _restart(postgres_server)
    # Nothing was applied: CURRENT still logs in, PENDING does not.
    assert await logs_in(old) == 1
    assert await logs_in(pending) is False
    # The next run resumes from set with the same pending value and completes.
    await rot.set()
    await rot.test()
    rot.finish()
    assert await logs_in(rot.current) == 1 and await logs_in(old) is False


async def test_server_stopped_during_set(
    pg_role: Role, postgres_server: PostgresServer, admin_conn: asyncpg.Connection
) -> None:
    rot = Rotation(PostgresRotator({"connect_timeout": "20s"}), pg_role.secret())
    old = dict(rot.current)
    pending = await rot.create()
    # Hold the role's catalog row so the rotator's ALTER ROLE blocks mid-statement.
    holder = admin_conn.transaction()
    await holder.start()
    await admin_conn.execute(f"ALTER ROLE {pg_role.name} CONNECTION LIMIT 50")
    set_task = asyncio.create_task(rot.set())
    try:
        await _wait_for_blocked_alter(postgres_server, pg_role.name)
        assert not set_task.done()
        await asyncio.to_thread(postgres_server.stop)
        with pytest.raises(BackendUnavailable):
            await asyncio.wait_for(set_task, 30)
    finally:
        await _restart(postgres_server)
        if not set_task.done():
            set_task.cancel()
    assert await logs_in(old) == 1, "the interrupted ALTER ROLE must not have committed"
    assert await logs_in(pending) is False
    await rot.set()
    await rot.test()
    rot.finish()
    assert await logs_in(rot.current) == 1 and await logs_in(old) is False


async def _wait_for_blocked_alter(server: PostgresServer, role: str) -> None:
    sql = (
        "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'secrets-agent' "
        f"AND wait_event_type = 'Lock' AND usename = '{role}'"
    )
    for _ in range(200):
        if (await asyncio.to_thread(server.psql, sql)).strip() == "1":
            return
        await asyncio.sleep(0.05)
    raise AssertionError("the rotator's ALTER ROLE never blocked on the held row")


def test_example_config_passes_check_config(capsys: pytest.CaptureFixture[str]) -> None:
    from pathlib import Path

    from agent.cli import main

    example = Path(__file__).resolve().parents[2] / "config/examples/rotation-postgres.yaml"
    assert main(["-c", str(example), "check-config"]) == 0, capsys.readouterr().err


async def test_no_value_in_any_log_record(pg_role: Role, caplog: pytest.LogCaptureFixture) -> None:
    """Every logger at DEBUG (ours and asyncpg's) through a rotation and a failed one."""
    caplog.set_level("DEBUG")
    rot = Rotation(
        PostgresRotator({"strategy": "alternating-users", "admin_secret": "a"}),
        pg_role.secret(),
        others={"a": _admin_secret(pg_role.server)},
    )
    await rot.rotate()
    values = [pg_role.password, rot.current["password"], pg_role.server.admin_password]
    bad = Rotation(PostgresRotator({}), pg_role.secret(password="wrong-" + pg_role.password))
    values += [bad.current["password"], (await bad.create())["password"]]
    with pytest.raises(AuthenticationFailed):
        await bad.set()
    text = "\n".join(f"{r.getMessage()} {r.exc_text or ''} {r.args!r}" for r in caplog.records)
    for value in values:
        assert value not in text
