"""The aiohttp application: native routes, the AWS-compatible ones, and the checks.

One application per listener (``unix`` or ``tcp``), all sharing one
:class:`ServerState`. Handlers parse, call the read path, serialise; errors
are mapped in one middleware; request checks (connection limit, identity,
forwarding, token, method) are a chain of small validators
(:mod:`agent.server.checks`).
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import Sequence
from functools import cache
from importlib import resources
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from agent.cache import Lookup
from agent.errors import BadRequest
from agent.server import aws
from agent.server.checks import Check, Limiter, guard, only_get, refuse_forwarded, unix_identity
from agent.server.errors import Handler, error_middleware
from agent.server.reads import read_secret
from agent.server.state import (
    CALLER,
    LISTENER,
    STATE,
    ServerState,
    StatusProvider,
    caller_of,
)
from agent.server.statusview import status_for
from agent.types import CURRENT, Secret

__all__ = [
    "CALLER",
    "LISTENER",
    "STATE",
    "ServerState",
    "StatusProvider",
    "build_app",
    "caller_of",
    "metrics",
    "secret_document",
]

_SECRET_QUERY = frozenset({"stage", "version", "key", "format", "refresh"})
_NO_STORE = {"Cache-Control": "no-store"}
DEFAULT_AWS_PREFIX = "/v1/"


# -------------------------------------------------------------------- middleware


@web.middleware
async def metrics_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Count and time requests by route template (bounded labels)."""
    started = time.perf_counter()
    response = await handler(request)
    info = request.match_info.route.resource
    route = info.canonical if info is not None else "unmatched"
    listener = request.app[LISTENER]
    m = request.app[STATE].metrics
    m.child(m.http_requests, listener, route, str(response.status)).inc()
    m.child(m.http_request_seconds, listener, route).observe(time.perf_counter() - started)
    return response


# ---------------------------------------------------------------------- handlers


def _query(request: web.Request, allowed: frozenset[str]) -> dict[str, str]:
    if not request.query_string:
        return {}
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


def _native_body(secret: Secret) -> bytes:
    return json.dumps(secret_document(secret)).encode()


def json_body_response(body: bytes, *, headers: dict[str, str]) -> web.Response:
    """A JSON response from a body serialised before (as :func:`web.json_response` says it)."""
    return web.Response(
        body=body, content_type="application/json", charset="utf-8", headers=headers
    )


def _headers(lookup: Lookup) -> dict[str, str]:
    headers = {**_NO_STORE, "X-Secret-Age": f"{lookup.age:.3f}"}
    if lookup.stale:
        headers["X-Secret-Stale"] = "true"
    return headers


def _key_response(lookup: Lookup, key: str, *, raw: bool) -> web.Response:
    secret = lookup.secret
    field_value = secret.value.json_key(key)
    if raw:
        text = field_value if isinstance(field_value, str) else json.dumps(field_value)
        return web.Response(text=text, content_type="text/plain", headers=_headers(lookup))
    doc = secret_document(secret)
    doc.pop("value", None)
    doc.pop("value_base64", None)
    doc["key"] = key
    doc["value"] = field_value
    return web.json_response(doc, headers=_headers(lookup))


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
    key = q.get("key")
    if key is not None:
        return _key_response(lookup, key, raw=fmt == "raw")
    secret = lookup.secret
    if fmt == "raw":
        ctype = "application/octet-stream" if secret.value_type == "binary" else "text/plain"
        return web.Response(
            body=secret.value.reveal(), content_type=ctype, headers=_headers(lookup)
        )
    return json_body_response(secret.body("native", _native_body), headers=_headers(lookup))


async def list_secrets(request: web.Request) -> web.StreamResponse:
    """``GET /v1/secrets``: the names this caller may read, with versions and stages."""
    _query(request, frozenset())
    state = request.app[STATE]
    caller = caller_of(request)
    items = []
    for name in state.cache.names():
        stage_map = state.cache.stage_map(name)
        if stage_map is None or not state.policy.may_list(caller, name):
            continue
        items.append(
            {
                "name": name,
                "version_id": stage_map.stages.get(CURRENT),
                "stages": dict(stage_map.stages),
            }
        )
    return web.json_response({"secrets": items}, headers=_NO_STORE)


async def healthz(request: web.Request) -> web.StreamResponse:
    """``GET /healthz``: the process is up."""
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.StreamResponse:
    """``GET /readyz``: every secret has loaded (or failed for good), every template rendered."""
    ready = request.app[STATE].ready.is_set()
    return web.json_response(
        {"status": "ready" if ready else "starting"}, status=200 if ready else 503
    )


async def status(request: web.Request) -> web.StreamResponse:
    """``GET /v1/status``: what the caller's rules let it see (see :mod:`.statusview`)."""
    _query(request, frozenset())
    state = request.app[STATE]
    doc = status_for(
        caller_of(request),
        state.policy,
        ready=state.ready.is_set(),
        secrets=state.cache.status(),
        parts=[lambda: {"audit": state.audit.status()}, *state.status_providers],
    )
    return web.json_response(doc, headers=_NO_STORE)


async def metrics(request: web.Request) -> web.StreamResponse:
    """``GET /metrics``: Prometheus text."""
    registry = request.app[STATE].metrics.registry
    body = await asyncio.to_thread(generate_latest, registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


@cache
def openapi_text() -> bytes:
    """The OpenAPI document shipped with the package (``agent/openapi.yaml``)."""
    return resources.files("agent").joinpath("openapi.yaml").read_bytes()


async def openapi(request: web.Request) -> web.StreamResponse:
    """``GET /v1/openapi.yaml``: the API description."""
    return web.Response(body=openapi_text(), content_type="application/yaml")


# ---------------------------------------------------------------------- assembly


def normalize_prefix(prefix: str) -> str:
    """``v1`` / ``/v1`` / ``/v1/`` all mean ``/v1/``."""
    return "/" + prefix.strip("/") + "/" if prefix.strip("/") else "/"


def build_app(
    state: ServerState,
    *,
    listener: str = "unix",
    checks: Sequence[Check] | None = None,
    max_connections: int | None = None,
    aws_path_prefix: str = DEFAULT_AWS_PREFIX,
) -> web.Application:
    """The application for one listener.

    Args:
        listener: ``unix`` or ``tcp`` (a metrics label and the caller's kind).
        checks: the request checks after the connection limit; the default
            is the Unix socket's (peer credentials, no forwarding, GET only).
        max_connections: requests in flight before 429 (default from state).
        aws_path_prefix: the prefix of the AWS path style (``GET /v1/<name>``).
    """
    prefix = normalize_prefix(aws_path_prefix)
    limiter = Limiter(max_connections if max_connections is not None else state.max_connections)
    chain = list(checks) if checks is not None else [unix_identity, refuse_forwarded, only_get]
    app = web.Application(
        middlewares=[metrics_middleware, error_middleware, guard(limiter, chain)],
        client_max_size=64 * 1024,
    )
    app[STATE] = state
    app[LISTENER] = listener
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/v1/status", status)
    app.router.add_get("/v1/openapi.yaml", openapi)
    app.router.add_get("/v1/secrets", list_secrets)
    app.router.add_get("/v1/secrets/{name:.+}", get_secret)
    aws.add_routes(app, prefix=prefix)
    return app
