"""The ``postgres`` rotator: PostgreSQL login credentials, single or alternating users.

The secret is JSON in the AWS database-secret shape (see
:mod:`agent.rotation.pgsql`), so ``rotate NAME`` needs no parameters for the
common case. Two strategies, as AWS offers:

* ``single-user``: one role; ``set`` changes its password, logging in either
  with the CURRENT credentials or with the admin secret's. Connections opened
  with the old password keep working; new ones need the new password as soon
  as ``set`` has run.
* ``alternating-users``: two roles, ``app`` and ``app_clone``; each rotation
  switches the secret to the other role and sets its password through the
  admin secret, so the PREVIOUS credentials keep working until the next
  rotation. The clone is created when missing, as a member of ``app`` whose
  sessions act as ``app`` (``ALTER ROLE app_clone SET role = app``), so both
  have the same privileges and create objects owned by ``app``.

Passwords go to the server as SCRAM-SHA-256 verifiers computed here, never in
plaintext; errors name roles, hosts and SQLSTATEs, never a value or a server
message about a statement that carried a verifier. The driver is asyncpg (the
``postgres`` extra), imported on first use.
"""

from __future__ import annotations

import asyncio
import contextlib
import string
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from agent.config import parse_duration
from agent.errors import AgentError, BackendUnavailable, ConfigError, NotFound
from agent.rotation.base import RotationContext, RotationFailed
from agent.rotation.pgsql import (
    DbSecret,
    base_user,
    new_password,
    other_user,
    parse_db_secret,
    quote_ident,
    quote_literal,
    scram_verifier,
)

if TYPE_CHECKING:
    import asyncpg

STRATEGIES = ("single-user", "alternating-users")
SSLMODES = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")
#: URL- and shell-safe by default, so a password drops into a DSN unquoted.
DEFAULT_ALPHABET = string.ascii_letters + string.digits + "-_.~"
_PUNCTUATION = "!#$%&()*+,:;<=>?[]^{|}"
_PARAMS = frozenset(
    {
        "strategy",
        "admin_secret",
        "password_length",
        "exclude_characters",
        "punctuation",
        "connect_timeout",
        "sslmode",
        "clone_suffix",
    }
)


class AuthenticationFailed(RotationFailed):
    """The server refused a login (wrong password, no such role, no LOGIN, pg_hba)."""


@dataclass(frozen=True, slots=True)
class PostgresParams:
    """The validated ``params`` of a ``postgres`` rotation rule."""

    strategy: str = "single-user"
    admin_secret: str | None = None
    password_length: int = 32
    alphabet: str = DEFAULT_ALPHABET
    connect_timeout: float = 10.0
    sslmode: str = "prefer"
    clone_suffix: str = "_clone"

    @classmethod
    def parse(cls, params: Mapping[str, Any]) -> PostgresParams:
        """Validate ``params``.

        Raises:
            ConfigError: an unknown or invalid parameter; ``path`` names it.
        """
        unknown = sorted(set(params) - _PARAMS)
        if unknown:
            raise ConfigError(
                "unknown parameter of the postgres rotator", path=f"params.{unknown[0]}"
            )
        d = cls()
        strategy = params.get("strategy", d.strategy)
        if strategy not in STRATEGIES:
            raise ConfigError(f"expected one of {', '.join(STRATEGIES)}", path="params.strategy")
        sslmode = params.get("sslmode", d.sslmode)
        if sslmode not in SSLMODES:
            raise ConfigError(f"expected one of {', '.join(SSLMODES)}", path="params.sslmode")
        admin = params.get("admin_secret")
        if admin is not None and (not isinstance(admin, str) or not admin):
            raise ConfigError("expected a secret name", path="params.admin_secret")
        length = params.get("password_length", d.password_length)
        if not isinstance(length, int) or isinstance(length, bool) or not 16 <= length <= 256:
            raise ConfigError("expected an integer from 16 to 256", path="params.password_length")
        suffix = params.get("clone_suffix", d.clone_suffix)
        if not isinstance(suffix, str) or not suffix or "\x00" in suffix:
            raise ConfigError("expected a non-empty string", path="params.clone_suffix")
        return cls(
            strategy=strategy,
            admin_secret=admin,
            password_length=length,
            alphabet=_alphabet(params),
            connect_timeout=_timeout(params.get("connect_timeout", d.connect_timeout)),
            sslmode=sslmode,
            clone_suffix=suffix,
        )


def _alphabet(params: Mapping[str, Any]) -> str:
    punctuation = params.get("punctuation", False)
    if not isinstance(punctuation, bool):
        raise ConfigError("expected true or false", path="params.punctuation")
    excluded = params.get("exclude_characters", "")
    if not isinstance(excluded, str):
        raise ConfigError("expected a string of characters", path="params.exclude_characters")
    alphabet = DEFAULT_ALPHABET + (_PUNCTUATION if punctuation else "")
    alphabet = "".join(c for c in alphabet if c not in excluded)
    if len(alphabet) < 32:
        raise ConfigError(
            "leaves fewer than 32 characters to draw passwords from",
            path="params.exclude_characters",
        )
    return alphabet


def _timeout(value: object) -> float:
    try:
        seconds = parse_duration(value)
    except ValueError as exc:
        raise ConfigError(str(exc), path="params.connect_timeout") from None
    if not 0 < seconds <= 300:
        raise ConfigError("expected a duration from 1ms to 5m", path="params.connect_timeout")
    return seconds


def _asyncpg() -> Any:
    try:
        import asyncpg
    except ModuleNotFoundError:
        raise ConfigError(
            "the postgres rotator needs the Python package 'asyncpg'; "
            "install secrets-agent with its extra: pip install 'secrets-agent[postgres]'"
        ) from None
    return asyncpg


class PostgresRotator:
    """Rotates PostgreSQL credentials held in a database secret (see the module doc)."""

    def __init__(self, params: Mapping[str, Any] | None = None) -> None:
        self.params = PostgresParams.parse(params or {})
        _asyncpg()  # a missing extra is a config error at start-up, not at the first rotation

    @property
    def alternating(self) -> bool:
        return self.params.strategy == "alternating-users"

    # --- the protocol --------------------------------------------------------------------

    async def create(self, ctx: RotationContext) -> bytes:
        """A new random password; the other role under the alternating strategy."""
        current = self._current(ctx, "create")
        username = current.username
        if self.alternating:
            try:
                username = other_user(username, suffix=self.params.clone_suffix)
            except RotationFailed as exc:
                raise RotationFailed(exc.message, step="create") from None
        password = new_password(self.params.password_length, self.params.alphabet)
        return current.with_login(username=username, password=password).to_json()

    async def set(self, ctx: RotationContext) -> None:
        """Give the pending role the pending password (creating the clone if needed)."""
        pending = self._pending(ctx, "set")
        try:
            verifier = scram_verifier(pending.password)
        except ValueError:
            raise RotationFailed(
                f"the PENDING password of {ctx.name!r} is not printable ASCII", step="set"
            ) from None
        alter = f"ALTER ROLE {quote_ident(pending.username)} PASSWORD {quote_literal(verifier)}"
        admin_name = self.params.admin_secret or pending.admin_secret
        if self.alternating or admin_name is not None:
            admin = await self._admin(ctx, pending, admin_name)
            async with self._session(
                admin, who=f"admin role {admin.username!r}", step="set"
            ) as conn:
                if self.alternating:
                    await self._ensure_role(conn, pending.username)
                await conn.execute(alter)
            return
        await self._set_as_self(ctx, pending, alter)

    async def test(self, ctx: RotationContext) -> None:
        """Log in with the pending credentials and run ``SELECT 1``."""
        pending = self._pending(ctx, "test")
        async with self._session(pending, who=f"role {pending.username!r}", step="test") as conn:
            if await conn.fetchval("SELECT 1") != 1:
                raise RotationFailed("SELECT 1 did not return 1", step="test")

    async def aclose(self) -> None:
        """Nothing to release: every step opens and closes its own connection."""

    # --- steps' parts --------------------------------------------------------------------

    def _current(self, ctx: RotationContext, step: str) -> DbSecret:
        what = f"the CURRENT value of {ctx.name!r}"
        try:
            return parse_db_secret(ctx.current, what=what)
        except RotationFailed as exc:
            raise RotationFailed(exc.message, step=step) from None

    def _pending(self, ctx: RotationContext, step: str) -> DbSecret:
        try:
            return parse_db_secret(ctx.pending, what=f"the PENDING value of {ctx.name!r}")
        except RotationFailed as exc:
            raise RotationFailed(exc.message, step=step) from None

    async def _set_as_self(self, ctx: RotationContext, pending: DbSecret, alter: str) -> None:
        """Single user, no admin: the role changes its own password, logged in with CURRENT."""
        current = self._current(ctx, "set")
        if current.username != pending.username:
            raise RotationFailed(
                f"PENDING and CURRENT of {ctx.name!r} name different roles; "
                "set params.strategy: alternating-users, or an admin_secret",
                step="set",
            )
        who = f"role {current.username!r} with the CURRENT password"
        try:
            async with self._session(current, who=who, step="set") as conn:
                await conn.execute(alter)
        except AuthenticationFailed:
            # A set that ran before a crash already replaced CURRENT's password.
            if await self._logs_in(pending):
                return
            raise AuthenticationFailed(
                f"neither the CURRENT nor the PENDING password of {ctx.name!r} "
                f"logs in as role {current.username!r}",
                step="set",
            ) from None

    async def _logs_in(self, login: DbSecret) -> bool:
        try:
            async with self._session(login, who=f"role {login.username!r}", step="set") as conn:
                await conn.fetchval("SELECT 1")
        except AuthenticationFailed:
            return False
        return True

    async def _admin(self, ctx: RotationContext, user: DbSecret, name: str | None) -> DbSecret:
        if name is None:
            raise RotationFailed(
                f"the alternating-users strategy for {ctx.name!r} needs admin credentials: "
                "set params.admin_secret, or an 'admin_secret' field in the secret",
                step="set",
            )
        if ctx.read_secret is None:
            raise RotationFailed(f"cannot read the admin secret {name!r} here", step="set")
        try:
            value = await ctx.read_secret(name)
        except NotFound:
            raise RotationFailed(f"admin secret {name!r} not found", step="set") from None
        try:
            return parse_db_secret(value, what=f"admin secret {name!r}", defaults=user)
        except RotationFailed as exc:
            raise RotationFailed(exc.message, step="set") from None

    async def _ensure_role(self, conn: asyncpg.Connection, role: str) -> None:
        """Create the clone role (a member of the base role, acting as it) if missing."""
        if await conn.fetchval("SELECT 1 FROM pg_roles WHERE rolname = $1", role):
            return
        base = base_user(role, suffix=self.params.clone_suffix)
        if base == role:
            raise RotationFailed(f"role {role!r} does not exist", step="set")
        clone, parent = quote_ident(role), quote_ident(base)
        try:
            async with conn.transaction():
                await conn.execute(f"CREATE ROLE {clone} WITH LOGIN IN ROLE {parent}")
                await conn.execute(f"ALTER ROLE {clone} SET role = {quote_literal(base)}")
        except _asyncpg().exceptions.DuplicateObjectError:
            return  # another agent created it at the same moment

    @contextlib.asynccontextmanager
    async def _session(
        self, login: DbSecret, *, who: str, step: str
    ) -> AsyncIterator[asyncpg.Connection]:
        """A connection as ``login``; driver errors become domain errors (no values)."""
        pg = _asyncpg()
        driver_errors = (OSError, TimeoutError, pg.PostgresError, pg.InterfaceError)
        where = f"{login.host}:{login.port}/{login.dbname}"
        timeout = self.params.connect_timeout
        try:
            async with asyncio.timeout(timeout * 2):
                conn = await pg.connect(
                    host=login.host,
                    port=login.port,
                    user=login.username,
                    password=login.password,
                    database=login.dbname,
                    ssl=self.params.sslmode,
                    timeout=timeout,
                    command_timeout=timeout,
                    server_settings={"application_name": "secrets-agent"},
                )
        except driver_errors as exc:
            raise _translate(exc, f"log in to {where} as {who}", step) from None
        try:
            yield conn
        except AgentError:
            raise
        except driver_errors as exc:
            raise _translate(exc, f"run the {step} step on {where} as {who}", step) from None
        finally:
            with contextlib.suppress(Exception):
                await conn.close(timeout=timeout)


def _translate(exc: BaseException, doing: str, step: str) -> AgentError:
    """The domain error for a driver or network error.

    Server messages are left out on purpose: one about a statement may quote
    it, and ours carry password verifiers.
    """
    pg = _asyncpg().exceptions
    code = getattr(exc, "sqlstate", None)
    detail = f"{type(exc).__name__}" + (f" (SQLSTATE {code})" if code else "")
    transient = (
        OSError,
        TimeoutError,
        pg.PostgresConnectionError,  # class 08
        pg.InsufficientResourcesError,  # class 53: too many connections
        pg.OperatorInterventionError,  # class 57: shutting down, starting up, cancelled
        pg.TransactionRollbackError,  # class 40: serialisation, deadlock
    )
    if isinstance(exc, pg.ClientConfigurationError):
        return RotationFailed(f"cannot {doing}: bad connection settings: {detail}", step=step)
    if isinstance(exc, transient) or (
        isinstance(exc, pg.InterfaceError) and not isinstance(exc, pg.ClientConfigurationError)
    ):
        return BackendUnavailable(f"cannot {doing}: server unreachable or busy: {detail}")
    if isinstance(exc, pg.InvalidAuthorizationSpecificationError):  # class 28
        return AuthenticationFailed(f"cannot {doing}: authentication failed: {detail}", step=step)
    if isinstance(exc, pg.InsufficientPrivilegeError):
        return RotationFailed(f"cannot {doing}: permission denied: {detail}", step=step)
    return RotationFailed(f"cannot {doing}: {detail}", step=step)
