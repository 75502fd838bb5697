"""The aiohttp application: routes, request checks and the shared state they read."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from agent.cache import Lookup, SecretCache
from agent.errors import AccessDenied, AgentError, BadRequest, TooManyRequests
from agent.metrics import Metrics
from agent.server.access import AccessPolicy
from agent.server.errors import Handler, error_middleware
from agent.server.peer import Caller, unix_peer
from agent.types import CURRENT, Secret, normalize_stage, validate_name

#: Read of the text a status provider contributes to ``/v1/status``.
StatusProvider = Callable[[], dict[str, Any]]


@dataclass
class ServerState:
    """What handlers need; built once by the daemon and shared by every listener."""

    cache: SecretCache
    policy: AccessPolicy
    metrics: Metrics
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    status_providers: list[StatusProvider] = field(default_factory=list)
    max_connections: int = 800
    inflight: int = 0


STATE = web.AppKey("state", ServerState)
LISTENER = web.AppKey("listener", str)
CALLER = "secrets_agent.caller"

_SECRET_QUERY = frozenset({"stage", "version", "key", "format", "refresh"})


def caller_of(request: web.Request) -> Caller:
    caller = request.get(CALLER)
    assert isinstance(caller, Caller)
    return caller


# ------------------------------------------------------------------ validators


@web.middleware
async def limit_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Answer 429 beyond ``max_connections`` requests in flight."""
    state = request.app[STATE]
    if state.inflight >= state.max_connections:
        raise TooManyRequests("too many requests in flight; retry shortly")
    state.inflight += 1
    try:
        return await handler(request)
    finally:
        state.inflight -= 1


@web.middleware
async def unix_identity_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Attach the caller from ``SO_PEERCRED``."""
    request[CALLER] = unix_peer(request)
    return await handler(request)


@web.middleware
async def metrics_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Count and time requests by route template (bounded labels)."""
    started = time.perf_counter()
    response = await handler(request)
    info = request.match_info.route.resource
    route = info.canonical if info is not None else "unmatched"
    listener = request.app[LISTENER]
    metrics = request.app[STATE].metrics
    metrics.http_requests.labels(listener, route, str(response.status)).inc()
    metrics.http_request_seconds.labels(listener, route).observe(time.perf_counter() - started)
    return response


# -------------------------------------------------------------------- handlers


def _query(request: web.Request, allowed: frozenset[str]) -> dict[str, str]:
    query = request.rel_url.query
    unknown = sorted(set(query) - allowed)
    if unknown:
        raise BadRequest(f"unknown query parameter(s): {', '.join(unknown)}")
    out = {}
    for key in query:
        values = query.getall(key)
        if len(values) > 1:
            raise BadRequest(f"query parameter {key!r} given more than once")
        out[key] = values[0]
    return out


def _bool(value: str | None, name: str) -> bool:
    if value is None:
        return False
    if value.lower() in ("true", "1", "yes"):
        return True
    if value.lower() in ("false", "0", "no"):
        return False
    raise BadRequest(f"query parameter {name!r} must be true or false")


def secret_document(secret: Secret) -> dict[str, Any]:
    """The JSON body of one secret (the value as text, or base64 for binary)."""
    doc: dict[str, Any] = {
        "name": secret.name,
        "version_id": secret.version_id,
        "version_stages": list(secret.stages),
        "created_at": secret.created_at.isoformat(),
    }
    if secret.value_type == "binary":
        doc["value_base64"] = base64.b64encode(secret.value.reveal()).decode()
    else:
        doc["value"] = secret.value.text()
    return doc


def _headers(lookup: Lookup) -> dict[str, str]:
    headers = {"Cache-Control": "no-store", "X-Secret-Age": f"{lookup.age:.3f}"}
    if lookup.stale:
        headers["X-Secret-Stale"] = "true"
    return headers


async def read_secret(
    request: web.Request, name: str, *, stage: str | None, version: str | None, refresh: bool
) -> Lookup:
    """Access check, then the cache: shared by the native and AWS-style routes.

    The name-level check happens before any lookup, so a denied read and a
    read of a missing secret look the same to the caller.
    """
    state = request.app[STATE]
    caller = caller_of(request)
    validate_name(name)
    if stage is not None:
        stage = normalize_stage(stage)
    decision = state.policy.check(caller, name)
    if not decision.allowed:
        state.metrics.access_decisions.labels(caller.listener, "deny").inc()
        raise AccessDenied(f"access to secret {name!r} is denied")
    if refresh:
        # A failed check is not an error here: the read below reports the secret's state.
        with contextlib.suppress(AgentError):
            await state.cache.refresh(name, trigger="request", force=True)
    lookup = await state.cache.get(name, stage=stage, version=version)
    stages = [stage or CURRENT] if version is None else list(lookup.secret.stages)
    if not state.policy.check(caller, name, stages).allowed:
        state.metrics.access_decisions.labels(caller.listener, "deny").inc()
        raise AccessDenied(f"access to secret {name!r} is denied")
    state.metrics.access_decisions.labels(caller.listener, "allow").inc()
    return lookup


async def get_secret(request: web.Request) -> web.StreamResponse:
    """``GET /v1/secrets/{name}``."""
    q = _query(request, _SECRET_QUERY)
    fmt = q.get("format", "json")
    if fmt not in ("json", "raw"):
        raise BadRequest("query parameter 'format' must be json or raw")
    lookup = await read_secret(
        request,
        request.match_info["name"],
        stage=q.get("stage"),
        version=q.get("version"),
        refresh=_bool(q.get("refresh"), "refresh"),
    )
    secret = lookup.secret
    key = q.get("key")
    if key is not None:
        field_value = secret.value.json_key(key)
        if fmt == "raw":
            text = field_value if isinstance(field_value, str) else json.dumps(field_value)
            return web.Response(text=text, content_type="text/plain", headers=_headers(lookup))
        doc = secret_document(secret)
        doc.pop("value", None)
        doc.pop("value_base64", None)
        doc["key"] = key
        doc["value"] = field_value
        return web.json_response(doc, headers=_headers(lookup))
    if fmt == "raw":
        ctype = "application/octet-stream" if secret.value_type == "binary" else "text/plain"
        return web.Response(
            body=secret.value.reveal(), content_type=ctype, headers=_headers(lookup)
        )
    return web.json_response(secret_document(secret), headers=_headers(lookup))


async def list_secrets(request: web.Request) -> web.StreamResponse:
    """``GET /v1/secrets``: the names this caller may read, with versions and stages."""
    _query(request, frozenset())
    state = request.app[STATE]
    caller = caller_of(request)
    items = []
    for name in state.cache.names():
        if not state.policy.may_list(caller, name):
            continue
        stage_map = state.cache.stage_map(name)
        items.append(
            {
                "name": name,
                "version_id": stage_map.stages.get(CURRENT) if stage_map else None,
                "stages": dict(stage_map.stages) if stage_map else {},
            }
        )
    return web.json_response({"secrets": items}, headers={"Cache-Control": "no-store"})


async def healthz(request: web.Request) -> web.StreamResponse:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.StreamResponse:
    ready = request.app[STATE].ready.is_set()
    return web.json_response(
        {"status": "ready" if ready else "starting"}, status=200 if ready else 503
    )


async def status(request: web.Request) -> web.StreamResponse:
    """``GET /v1/status``: versions, ages, last refresh and error per secret; no values."""
    state = request.app[STATE]
    caller = caller_of(request)
    doc: dict[str, Any] = {
        "ready": state.ready.is_set(),
        "secrets": [s for s in state.cache.status() if state.policy.may_list(caller, s["name"])],
    }
    for provider in state.status_providers:
        doc.update(provider())
    return web.json_response(doc, headers={"Cache-Control": "no-store"})


async def metrics(request: web.Request) -> web.StreamResponse:
    registry = request.app[STATE].metrics.registry
    body = await asyncio.to_thread(generate_latest, registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


def build_app(
    state: ServerState,
    *,
    listener: str = "unix",
    identity: Callable[[web.Request, Handler], Awaitable[web.StreamResponse]] | None = None,
) -> web.Application:
    """The application for one listener (``unix`` or ``tcp``)."""
    middlewares: list[Any] = [
        metrics_middleware,
        error_middleware,
        limit_middleware,
        identity if identity is not None else unix_identity_middleware,
    ]
    app = web.Application(middlewares=middlewares, client_max_size=64 * 1024)
    app[STATE] = state
    app[LISTENER] = listener
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/v1/status", status)
    app.router.add_get("/v1/secrets", list_secrets)
    app.router.add_get("/v1/secrets/{name:.+}", get_secret)
    return app
