"""Property: malformed paths, names, queries and headers on both listeners never get a 5xx.

Every answer must also be described by docs/openapi.yaml (checked by
:class:`Served`), and no answer but a 200 may contain a secret value.
"""

from __future__ import annotations

import json
import os
import urllib.parse
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from tests.server.conftest import Served, ServeTcp, ServeUnix, World

VALUES = ("fuzz-value-text-7f3a", "fuzz-binary-9c1e", "fuzz-status-55d2")
RULES: list[dict[str, Any]] = [
    {"secrets": ["app/*", "status"], "uids": [os.getuid()], "stages": ["CURRENT", "PREVIOUS"]},
    {"secrets": ["app/*"], "token": "app"},
]

PREFIXES = [
    "/v1/secrets/",
    "/v1/secrets",
    "/v1/",
    "/v1",
    "/v1/status",
    "/v1/openapi.yaml",
    "/secretsmanager/get",
    "/secretsmanager/",
    "/ping",
    "/healthz",
    "/readyz",
    "/metrics",
    "/",
    "",
]
NAMES = ["app/db", "app/bin", "status", "app/", "app//db", "../app/db", "app/./db", "a" * 600]
KEYS = [
    "secretId",
    "versionId",
    "versionStage",
    "refreshNow",
    "stage",
    "version",
    "key",
    "format",
    "refresh",
]
VALUES_Q = ["AWSCURRENT", "AWSPREVIOUS", "PENDING", "true", "raw", "1", "", "app/db", "nope"]
# Printable text plus the characters that trip parsers: %, /, dots, NUL, controls, non-ASCII.
TEXT = st.text(
    alphabet=st.one_of(
        st.sampled_from("/%.?#&=+;: \\\"'<>{}[]\x00\x7f\t"),
        st.characters(codec="utf-8"),  # no surrogates
    ),
    max_size=40,
)


def _quote(text: str) -> str:
    # Keep "%" as is so that invalid escapes (%zz, %2F, %00) reach the server.
    return urllib.parse.quote(text, safe="/%")


#: Well-formed requests, so that a good share of the examples reach the read path.
VALID = [
    "/v1/secrets/app/db",
    "/v1/secrets/app/db?key=password",
    "/v1/secrets/app/db?stage=PREVIOUS&format=raw",
    "/v1/secrets/app/bin?format=raw",
    "/v1/secrets/status?refresh=true",
    "/v1/secrets/other/x",
    "/v1/secrets",
    "/v1/status",
    "/v1/app/db",
    "/v1/status?x=1",
    "/secretsmanager/get?secretId=app/db",
    "/secretsmanager/get?secretId=app/db&versionStage=AWSPREVIOUS",
    "/secretsmanager/get?secretId=app/bin&refreshNow=1",
    "/secretsmanager/get?secretId=status",
    "/secretsmanager/get?secretId=arn:aws:secretsmanager:local:000000000000:secret:app/db",
    "/readyz",
    "/ping",
]


@st.composite
def _path(draw: st.DrawFn) -> str:
    if draw(st.booleans()):
        path = draw(st.sampled_from(VALID))
        return path + draw(st.sampled_from(["", "", "&", "&stage=", "%zz", "&refreshNow=x"]))
    path = draw(st.sampled_from(PREFIXES)) + _quote(draw(st.one_of(st.sampled_from(NAMES), TEXT)))
    pairs = draw(
        st.lists(
            st.tuples(
                st.one_of(st.sampled_from(KEYS), TEXT), st.one_of(st.sampled_from(VALUES_Q), TEXT)
            ),
            max_size=4,
        )
    )
    query = "&".join(f"{_quote(k)}={_quote(v)}" for k, v in pairs)
    if draw(st.booleans()):
        query += draw(st.sampled_from(["&", "&&", "=", "a", "=b", "%zz=%"]))
    path = "/" + path.lstrip("/") if not path.startswith("/") else path
    return path + ("?" + query if query else "")


@st.composite
def requests(draw: st.DrawFn) -> tuple[str, str, str, dict[str, str], bool]:
    listener = draw(st.sampled_from(["unix", "tcp"]))
    method = draw(st.sampled_from(["GET"] * 8 + ["HEAD", "POST", "PUT", "DELETE", "PATCH"]))
    headers = {}
    if draw(st.integers(0, 9)) == 0:
        headers["X-Forwarded-For"] = "192.0.2.1"
    token = draw(st.sampled_from(["good"] * 6 + ["none", "bad"]))
    if token == "bad":
        headers["X-Aws-Parameters-Secrets-Token"] = "bad-token"
    return listener, method, draw(_path()), headers, token == "good"


@pytest.fixture
async def listeners(world: World, serve_unix: ServeUnix, serve_tcp: ServeTcp) -> dict[str, Served]:
    world.set_rules(RULES)
    await world.put("app/db", json.dumps({"user": "u", "password": VALUES[0]}))
    await world.put("app/bin", VALUES[1].encode(), binary=True)
    await world.put("status", VALUES[2])
    await world.put("app/db", json.dumps({"password": VALUES[0]}))
    return {"unix": await serve_unix(), "tcp": await serve_tcp()}


@pytest.mark.timeout(360)  # 2,000 requests: about 100 s on a loaded 2-core machine
@settings(
    max_examples=2000,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(request=requests())
async def test_no_malformed_request_gets_a_5xx_or_an_answer_outside_the_spec(
    listeners: dict[str, Served], request: tuple[str, str, str, dict[str, str], bool]
) -> None:
    listener, method, path, headers, token = request
    answer = await listeners[listener].request(
        path, method=method, headers=headers, encoded=True, token=token
    )
    event(f"{listener} {answer.status}")
    assert answer.status < 500, (listener, method, path, answer.body)
    if answer.status != 200:
        for value in VALUES:
            assert value.encode() not in answer.body
