"""AWS-compatible routes: GetSecretValue as the AWS Secrets Manager Agent serves it.

* ``GET /secretsmanager/get?secretId=&versionId=&versionStage=&refreshNow=``
  (the Lambda extension's query style) and ``GET <prefix><secretId>`` (the
  agent's path style; prefix ``/v1/`` by default). Native routes under the
  same prefix (``/v1/secrets``, ``/v1/secrets/...``, ``/v1/status``,
  ``/v1/openapi.yaml``) take precedence; read such names with the query style.
* ``GET /ping`` answers ``healthy`` (no token needed).
* The answer is the GetSecretValue JSON: ``ARN`` (the store's real one on
  AWS Secrets Manager, else a stable synthetic one: see :mod:`agent.server.arn`),
  ``Name``, ``VersionId``, ``SecretString`` or base64 ``SecretBinary``,
  ``VersionStages`` (``AWSCURRENT``-style), ``CreatedDate`` (epoch seconds).
* ``secretId`` may be a name, a full ARN or a partial ARN, on both routes.
* Errors are ``{"__type", "message"}``; an unknown or repeated parameter, a
  missing ``secretId`` or a bad ``refreshNow`` is 400
  ``InvalidParameterException`` (with the AWS agent's messages), a missing
  secret, version or stage is ``ResourceNotFoundException`` with Secrets
  Manager's messages and status, a ``versionId`` that does not carry the
  ``versionStage`` is 400 ``InvalidRequestException``, a caller no rule lets
  read the name gets 403 ``AccessDeniedException``.
"""

from __future__ import annotations

import base64
import json
from functools import partial
from typing import Any

from aiohttp import web

from agent.cache import Lookup
from agent.errors import SecretNotFound, VersionNotFound
from agent.server.arn import arn_for, candidates
from agent.server.errors import AWS_NOT_FOUND_STATUS, AWS_ROUTE_PREFIX, ApiError
from agent.server.reads import StageMismatch, read_secret
from agent.server.state import STATE
from agent.types import AWS_STAGE_NAMES, Secret, normalize_stage

_QUERY = ("secretId", "versionId", "versionStage", "refreshNow")
_PATH_QUERY = ("versionId", "versionStage", "refreshNow")
_NO_STORE = {"Cache-Control": "no-store"}


def invalid_parameter(message: str) -> ApiError:
    """400 ``InvalidParameterException`` (``bad_request`` in the native shape)."""
    return ApiError(message, status=400, code="bad_request", aws_type="InvalidParameterException")


def _not_found(message: str, code: str) -> ApiError:
    return ApiError(
        message, status=AWS_NOT_FOUND_STATUS, code=code, aws_type="ResourceNotFoundException"
    )


def _params(request: web.Request, allowed: tuple[str, ...]) -> dict[str, str]:
    """The query as a dict; unknown or repeated parameters are refused, as the AWS agent does."""
    query = request.rel_url.query
    out: dict[str, str] = {}
    for key, value in query.items():
        if key not in allowed:
            raise invalid_parameter(f"unknown parameter: {key}")
        if key in out:
            raise invalid_parameter(f"parameter given more than once: {key}")
        out[key] = value
    return out


def _refresh_now(value: str | None) -> bool:
    if value is None:
        return False
    lowered = value.lower()
    if lowered in ("true", "1"):
        return True
    if lowered in ("false", "0"):
        return False
    raise invalid_parameter("invalid refreshNow value")


def get_secret_value_document(secret: Secret, *, arn: str) -> dict[str, Any]:
    """The GetSecretValue JSON of one version."""
    doc: dict[str, Any] = {
        "ARN": arn,
        "Name": secret.name,
        "VersionId": secret.version_id,
    }
    if secret.value_type == "binary":
        doc["SecretBinary"] = base64.b64encode(secret.value.reveal()).decode("ascii")
    else:
        doc["SecretString"] = secret.value.text()
    doc["VersionStages"] = [AWS_STAGE_NAMES.get(s, s) for s in secret.stages]
    doc["CreatedDate"] = round(secret.created_at.timestamp(), 3)
    return doc


async def _resolve(request: web.Request, secret_id: str, **read: Any) -> tuple[Lookup, str]:
    """Read the secret ``secret_id`` names (a name, full or partial ARN); return it and its ARN.

    Raises:
        SecretNotFound: no reading of ``secret_id`` names a secret (with that ARN).
    """
    state = request.app[STATE]
    for candidate in candidates(secret_id, state.arns):
        try:
            lookup = await read_secret(request, candidate.name, **read)
        except SecretNotFound:
            continue
        arn, real = arn_for(candidate.name, region=state.region, arns=state.arns)
        if candidate.accepts(arn, real=real):
            return lookup, arn
    raise SecretNotFound(f"no secret matches {secret_id!r}")


async def _get_secret_value(
    request: web.Request, secret_id: str, params: dict[str, str]
) -> web.Response:
    stage = params.get("versionStage")
    version = params.get("versionId")
    refresh = _refresh_now(params.get("refreshNow"))
    try:
        lookup, arn = await _resolve(
            request, secret_id, stage=stage, version=version, refresh=refresh
        )
    except SecretNotFound as exc:
        raise _not_found("Secrets Manager can't find the specified secret.", exc.code) from None
    except VersionNotFound as exc:
        if version is not None:
            what = f"VersionId: {version}"
        else:
            label = normalize_stage(stage) if stage is not None else "CURRENT"
            what = f"staging label: {AWS_STAGE_NAMES.get(label, label)}"
        message = f"Secrets Manager can't find the specified secret value for {what}"
        raise _not_found(message, exc.code) from None
    except StageMismatch as exc:
        raise ApiError(
            "You provided a VersionStage that is not associated to the provided VersionId.",
            status=400,
            code=exc.code,
            aws_type="InvalidRequestException",
        ) from None
    body = lookup.secret.body(f"aws:{arn}", partial(_aws_body, arn=arn))
    return web.Response(
        body=body, content_type="application/json", charset="utf-8", headers=_NO_STORE
    )


def _aws_body(secret: Secret, *, arn: str) -> bytes:
    return json.dumps(get_secret_value_document(secret, arn=arn)).encode()


async def get_secret_value(request: web.Request) -> web.StreamResponse:
    """``GET /secretsmanager/get?secretId=...``: the Lambda extension's style."""
    params = _params(request, _QUERY)
    secret_id = params.pop("secretId", "")
    if not secret_id:
        raise invalid_parameter("missing parameter secretId")
    return await _get_secret_value(request, secret_id, params)


async def get_secret_value_by_path(request: web.Request) -> web.StreamResponse:
    """``GET <prefix><secretId>``: the AWS agent's path style."""
    params = _params(request, _PATH_QUERY)
    return await _get_secret_value(request, request.match_info["secretId"], params)


async def missing_secret_id(request: web.Request) -> web.StreamResponse:
    """``GET <prefix>`` with nothing after it."""
    raise invalid_parameter("missing secret ID")


async def ping(request: web.Request) -> web.StreamResponse:
    """``GET /ping``: the AWS agent's health check (no token needed)."""
    return web.Response(text="healthy", content_type="text/plain")


def add_routes(app: web.Application, *, prefix: str) -> None:
    """Register the AWS-compatible routes; call after the native ones."""
    app.router.add_get("/ping", ping, name=f"{AWS_ROUTE_PREFIX}ping")
    app.router.add_get("/secretsmanager/get", get_secret_value, name=f"{AWS_ROUTE_PREFIX}get")
    app.router.add_get(prefix, missing_secret_id, name=f"{AWS_ROUTE_PREFIX}prefix")
    app.router.add_get(
        prefix + "{secretId:.+}", get_secret_value_by_path, name=f"{AWS_ROUTE_PREFIX}path"
    )
