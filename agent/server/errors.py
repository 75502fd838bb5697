"""One error middleware: domain errors and HTTP errors become JSON, never a trace."""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable

from aiohttp import web

from agent.errors import AgentError, BackendUnavailable

log = logging.getLogger(__name__)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

_HTTP_CODES = {
    400: "bad_request",
    403: "access_denied",
    404: "not_found",
    405: "method_not_allowed",
    413: "too_large",
    414: "uri_too_long",
    429: "too_many_requests",
}


def error_response(
    status: int, code: str, message: str, *, headers: dict[str, str] | None = None
) -> web.Response:
    """``{"error": {"code", "message"}}`` with ``status``."""
    body = json.dumps({"error": {"code": code, "message": message}})
    return web.Response(
        status=status,
        text=body,
        content_type="application/json",
        headers={"Cache-Control": "no-store", **(headers or {})},
    )


def agent_error_response(exc: AgentError) -> web.Response:
    headers = {}
    if isinstance(exc, BackendUnavailable):
        headers["Retry-After"] = str(max(1, round(exc.retry_after)))
    status = exc.status if 400 <= exc.status < 600 and exc.status != 500 else 503
    return error_response(status, exc.code, exc.message, headers=headers)


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Map errors to JSON. A bug answers 500 with no detail and is logged."""
    try:
        return await handler(request)
    except AgentError as exc:
        return agent_error_response(exc)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        headers = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
        code = _HTTP_CODES.get(exc.status, "http_error")
        return error_response(exc.status, code, exc.reason, headers=headers)
    except Exception:
        log.exception("internal error on %s %s", request.method, request.rel_url.path)
        return error_response(500, "internal", "internal error")
