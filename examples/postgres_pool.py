"""An app's asyncpg pool that takes its PostgreSQL credentials from the agent.

Every new connection reads the database secret's CURRENT value from the agent,
so a pool keeps working while the ``postgres`` rotator rotates the password:
open connections stay logged in, and new ones use the new credentials. With the
``alternating-users`` strategy the PREVIOUS credentials keep working until the
next rotation, so nothing ever fails; with ``single-user`` there is a moment
between ``set`` and ``finish`` when the new password is not CURRENT yet, which
the retry on an authentication failure covers.

    SECRETS_AGENT_SOCKET=/run/secrets-agent/agent.sock python examples/postgres_pool.py prod/db

Needs asyncpg 0.30 or later (the pool's ``connect`` argument).
"""

from __future__ import annotations

import asyncio
import sys
from typing import Any

import asyncpg

from agent.client import AsyncSecretsClient

#: Attempts of one new connection when the server refuses the credentials read.
AUTH_ATTEMPTS = 5


async def connect_with_agent(
    client: AsyncSecretsClient, name: str, **kwargs: Any
) -> asyncpg.Connection:
    """A new connection with the credentials the agent holds now for ``name``.

    On an authentication failure (the secret was rotated between the read and
    the login, or the agent has not seen the rotation yet) it reads again.
    """
    for attempt in range(1, AUTH_ATTEMPTS + 1):
        creds = await client.get_json(name)
        try:
            return await asyncpg.connect(
                host=creds["host"],
                port=int(creds.get("port", 5432)),
                user=creds["username"],
                password=creds["password"],
                database=creds.get("dbname", "postgres"),
                **kwargs,
            )
        except asyncpg.InvalidAuthorizationSpecificationError:
            if attempt == AUTH_ATTEMPTS:
                raise
            await asyncio.sleep(0.05 * attempt)
    raise AssertionError("unreachable")


def rotating_pool(client: AsyncSecretsClient, name: str, **pool_kwargs: Any) -> asyncpg.Pool:
    """``asyncpg.create_pool`` whose connections log in with the agent's credentials."""

    async def connect(*_args: Any, **kwargs: Any) -> asyncpg.Connection:
        # The pool passes its connect_kwargs (loop, connection_class, ...) through.
        return await connect_with_agent(client, name, **kwargs)

    return asyncpg.create_pool(connect=connect, **pool_kwargs)


async def main(name: str) -> int:
    # The client finds the agent at $SECRETS_AGENT_SOCKET, else the default socket.
    async with (
        AsyncSecretsClient() as client,
        rotating_pool(client, name, min_size=1, max_size=4) as pool,
    ):
        for _ in range(10):
            print("SELECT 1 ->", await pool.fetchval("SELECT 1"))
            await asyncio.sleep(1)
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main(sys.argv[1] if len(sys.argv) > 1 else "prod/db")))
