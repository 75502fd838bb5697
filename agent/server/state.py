"""What every listener's handlers share, and the keys they find it under."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from agent.audit import Auditor, NullAudit
from agent.cache import SecretCache
from agent.metrics import Metrics
from agent.server.access import AccessPolicy
from agent.server.arn import ArnSource
from agent.server.peer import Caller, PeerIdentities

#: Read of the fields a status provider contributes to ``/v1/status``.
StatusProvider = Callable[[], dict[str, Any]]


@dataclass
class ServerState:
    """What handlers need; built once by the daemon and shared by every listener.

    ``policy`` is replaced on reload; ``audit`` receives one record per read
    decision. ``region`` goes into the synthetic ARNs of the AWS-compatible
    routes; ``arns`` is the store, when it knows its secrets' real ARNs.
    """

    cache: SecretCache
    policy: AccessPolicy
    metrics: Metrics
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    status_providers: list[StatusProvider] = field(default_factory=list)
    max_connections: int = 800
    audit: Auditor = field(default_factory=NullAudit)
    region: str = "local"
    peers: PeerIdentities = field(default_factory=PeerIdentities)
    arns: ArnSource | None = None


STATE = web.AppKey("state", ServerState)
LISTENER = web.AppKey("listener", str)
#: Request key of the :class:`Caller`, set by the identity check (aiohttp >= 3.14).
CALLER = web.RequestKey("caller", Caller)


def caller_of(request: web.Request) -> Caller:
    """The caller the identity check attached to ``request``."""
    caller = request.get(CALLER)
    if not isinstance(caller, Caller):
        # Routes are only reached through the checks; this is a wiring bug.
        raise RuntimeError("no caller identified for this request")
    return caller
