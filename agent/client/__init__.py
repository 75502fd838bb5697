"""A small client for apps: read secrets from the agent.

:class:`SecretsClient` uses only the standard library (this module imports
nothing else, so an app can vendor or import it without the agent's
dependencies); :class:`AsyncSecretsClient` uses aiohttp, imported when one is
created. Errors are typed: :class:`ClientError` and its subclasses carry the
HTTP status and the agent's error code, never a value or a token.

Where the agent is:

* the Unix socket (default): the ``socket_path`` argument, else
  ``$SECRETS_AGENT_SOCKET``, else the default
  (``/run/secrets-agent/agent.sock`` as root, else
  ``$XDG_RUNTIME_DIR/secrets-agent/agent.sock``);
* or the loopback TCP listener: ``base_url="http://127.0.0.1:2773"`` with
  ``token=`` (else ``$SECRETS_AGENT_TOKEN``), sent as
  ``X-Secrets-Agent-Token``. Only loopback hosts are accepted, so the token
  is never sent off the machine.
"""

from __future__ import annotations

from agent.client._base import (
    TOKEN_HEADER,
    AccessDeniedError,
    BadRequestError,
    ClientError,
    NotFoundError,
    TooManyRequestsError,
    UnavailableError,
    default_socket_path,
    raise_for,
    resolve_socket,
    secret_path,
)
from agent.client.aio import AsyncSecretsClient
from agent.client.sync import SecretsClient

__all__ = [
    "TOKEN_HEADER",
    "AccessDeniedError",
    "AsyncSecretsClient",
    "BadRequestError",
    "ClientError",
    "NotFoundError",
    "SecretsClient",
    "TooManyRequestsError",
    "UnavailableError",
    "default_socket_path",
    "raise_for",
    "resolve_socket",
    "secret_path",
]
