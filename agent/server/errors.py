"""One error middleware: domain errors and HTTP errors become JSON, never a trace.

Two shapes, chosen by the route family:

* native routes: ``{"error": {"code": "...", "message": "..."}}``;
* AWS-compatible routes (``/secretsmanager/get`` and the path style under the
  AWS prefix): ``{"__type": "ResourceNotFoundException", "message": "..."}``,
  as the AWS Secrets Manager Agent and the Lambda extension answer.

Bodies are built with :func:`json.dumps`, so names and messages are escaped.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Awaitable, Callable

from aiohttp import web

from agent.errors import (
    AccessDenied,
    AgentError,
    BackendUnavailable,
    BadRequest,
    DecryptionError,
    NotFound,
    TooManyRequests,
)

log = logging.getLogger(__name__)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

#: Routes whose name starts with this answer errors in the AWS shape.
AWS_ROUTE_PREFIX = "aws_"

#: HTTP status of ``ResourceNotFoundException`` on the AWS routes. Secrets
#: Manager is an awsJson1.1 service whose client errors are all HTTP 400, and
#: the AWS Secrets Manager Agent passes that status through; so do we.
AWS_NOT_FOUND_STATUS = 400

_HTTP_CODES = {
    400: "bad_request",
    403: "access_denied",
    404: "not_found",
    405: "method_not_allowed",
    413: "too_large",
    414: "uri_too_long",
    429: "too_many_requests",
}

# First match wins: subclasses before their bases.
_AWS_TYPES: tuple[tuple[type[AgentError], int, str], ...] = (
    (AccessDenied, 403, "AccessDeniedException"),
    (NotFound, AWS_NOT_FOUND_STATUS, "ResourceNotFoundException"),
    (BadRequest, 400, "InvalidParameterException"),
    (TooManyRequests, 429, "ThrottlingException"),
    (BackendUnavailable, 503, "InternalServiceError"),
    (DecryptionError, 400, "DecryptionFailure"),
)


class ApiError(AgentError):
    """An error the HTTP layer raises itself, with its status and its code in both shapes."""

    def __init__(
        self,
        message: str,
        *,
        status: int,
        code: str,
        aws_type: str,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.aws_type = aws_type
        self.headers = dict(headers or {})


def _json(status: int, doc: object, headers: dict[str, str] | None) -> web.Response:
    return web.Response(
        status=status,
        text=json.dumps(doc),
        content_type="application/json",
        headers={"Cache-Control": "no-store", **(headers or {})},
    )


# An absolute path of two or more components at the start of a message or after
# a space, quote, "(" or "=" (so neither "app/db", "http://host" nor "</x>" matches).
_ABS_PATH = re.compile(r"(?<![^\s'\"(=])/[^\s/'\"(),;<>]+(?:/[^\s/'\"(),;<>]*)+")


def redact_paths(message: str) -> str:
    """``message`` with each absolute path cut to its last component (``…/stages.json``).

    Error bodies go to callers who need not know how the host is laid out.
    """
    return _ABS_PATH.sub(lambda m: "…/" + m.group(0).rstrip("/").rsplit("/", 1)[-1], message)


def error_response(
    status: int, code: str, message: str, *, headers: dict[str, str] | None = None
) -> web.Response:
    """``{"error": {"code", "message"}}`` with ``status``."""
    return _json(status, {"error": {"code": code, "message": redact_paths(message)}}, headers)


def aws_error_response(
    status: int, aws_type: str, message: str, *, headers: dict[str, str] | None = None
) -> web.Response:
    """``{"__type", "message"}`` with ``status``, as the AWS agent answers."""
    return _json(status, {"__type": aws_type, "message": redact_paths(message)}, headers)


def _headers_of(exc: AgentError) -> dict[str, str]:
    headers = dict(exc.headers) if isinstance(exc, ApiError) else {}
    if isinstance(exc, BackendUnavailable):
        headers["Retry-After"] = str(max(1, round(exc.retry_after)))
    return headers


def agent_error_response(exc: AgentError, *, aws: bool = False) -> web.Response:
    """The response for a domain error, in the native or the AWS shape."""
    headers = _headers_of(exc)
    if aws:
        if isinstance(exc, ApiError):
            return aws_error_response(exc.status, exc.aws_type, exc.message, headers=headers)
        for cls, status, aws_type in _AWS_TYPES:
            if isinstance(exc, cls):
                return aws_error_response(status, aws_type, exc.message, headers=headers)
        return aws_error_response(503, "InternalServiceError", exc.message, headers=headers)
    status = exc.status if 400 <= exc.status < 600 and exc.status != 500 else 503
    return error_response(status, exc.code, exc.message, headers=headers)


async def is_aws_request(request: web.Request) -> bool:
    """Whether errors for this request take the AWS shape: it is routed to an AWS route.

    A request refused for its method has no route; the route a GET to the same
    path would take decides, so the shape does not depend on the method.
    """
    name = request.match_info.route.name
    if name is None and request.method != "GET":
        match = await request.app.router.resolve(request.clone(method="GET"))
        name = match.route.name
    return name is not None and name.startswith(AWS_ROUTE_PREFIX)


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Map errors to JSON. A bug answers 500 with no detail and is logged."""
    try:
        return await handler(request)
    except AgentError as exc:
        return agent_error_response(exc, aws=await is_aws_request(request))
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        headers = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
        if await is_aws_request(request):
            return aws_error_response(
                exc.status, "InvalidRequestException", exc.reason, headers=headers
            )
        code = _HTTP_CODES.get(exc.status, "http_error")
        return error_response(exc.status, code, exc.reason, headers=headers)
    except Exception:
        log.exception("internal error on %s %s", request.method, request.rel_url.path)
        if await is_aws_request(request):
            return aws_error_response(500, "InternalFailure", "internal error")
        return error_response(500, "internal", "internal error")
