"""Checks answers against docs/openapi.yaml: every status and body the tests see must be in it."""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jsonschema
import yaml

SPEC_PATH = Path(__file__).resolve().parents[2] / "docs" / "openapi.yaml"
_PARAM = re.compile(r"\{[A-Za-z_]+\}")
_TEXT_TYPES = ("text/plain", "application/yaml")
_CHECKS = frozenset({400, 403, 405, 429})
_UNROUTED = {
    400: "BadRequest",
    403: "Forbidden",
    404: "NotFound",
    405: "MethodNotAllowed",
    429: "TooManyRequests",
}


class Spec:
    """The OpenAPI document, with a path matcher that mirrors the app's routing."""

    def __init__(self, path: Path = SPEC_PATH) -> None:
        self.doc: dict[str, Any] = yaml.safe_load(path.read_text(encoding="utf-8"))
        self._routes = self._sorted_routes()
        self._validators: dict[int, jsonschema.protocols.Validator] = {}

    def _sorted_routes(self) -> list[tuple[str, re.Pattern[str]]]:
        # Literal paths first, then templates with the longest literal part first,
        # as aiohttp resolves (native /v1/secrets/{name} before /v1/{secretId}).
        templates = sorted(self.doc["paths"], key=lambda t: ("{" in t, -len(_PARAM.sub("", t))))
        return [(t, self._regex(t)) for t in templates]

    @staticmethod
    def _regex(template: str) -> re.Pattern[str]:
        parts = _PARAM.split(template)
        return re.compile(".+".join(re.escape(p) for p in parts) + r"\Z")

    def match(self, path: str) -> str | None:
        """The spec path template that serves ``path`` (None: no route)."""
        for template, regex in self._routes:
            if regex.match(path):
                return template
        return None

    def resolve(self, node: dict[str, Any]) -> dict[str, Any]:
        while "$ref" in node:
            target: Any = self.doc
            for part in node["$ref"].removeprefix("#/").split("/"):
                target = target[part]
            node = target
        return node

    def response(self, method: str, path: str, status: int) -> dict[str, Any]:
        """The documented response for this answer (AssertionError if there is none)."""
        template = self.match(path)
        responses = self.doc["components"]["responses"]
        # The request checks run before routing, in order: limit (429), forwarding
        # (400), token (403), method (405). A wrong method can only be refused by
        # them; a path that matches no route can be refused by them or get 404.
        if method in ("GET", "HEAD"):
            assert status != 405, f"{method} {path}: 405 for a GET"
        else:
            assert status in _CHECKS, f"{method} {path}: {status}, expected 405 or a check's"
        if template is None:
            name = _UNROUTED.get(status)
            assert name is not None, f"{method} {path}: no route, got {status}"
            return self.resolve(responses[name])
        documented = self.doc["paths"][template]["get"]["responses"]
        assert str(status) in documented, f"{method} {path} ({template}): {status} not in the spec"
        return self.resolve(documented[str(status)])

    def with_aws_prefix(self, prefix: str) -> Spec:
        """The spec as served with ``aws_path_prefix: prefix`` instead of ``/v1/``."""
        other = copy.copy(self)
        paths = dict(self.doc["paths"])
        paths[prefix] = paths.pop("/v1/")
        paths[prefix + "{secretId}"] = paths.pop("/v1/{secretId}")
        other.doc = {**self.doc, "paths": paths}
        other._routes = other._sorted_routes()
        return other

    def _validator(self, schema: dict[str, Any]) -> jsonschema.protocols.Validator:
        key = id(schema)
        if key not in self._validators:
            root = {**schema, "components": self.doc["components"]}
            self._validators[key] = jsonschema.Draft202012Validator(root)
        return self._validators[key]

    def check(
        self, method: str, path: str, status: int, headers: Mapping[str, str], body: bytes
    ) -> None:
        """Assert that the answer (status, headers, body) is described by the spec."""
        response = self.response(method, path, status)
        where = f"{method} {path} -> {status}"
        for name, header in response.get("headers", {}).items():
            value = headers.get(name)
            if name in ("Allow", "Retry-After"):
                assert value is not None, f"{where}: header {name} missing"
            if value is not None:
                schema = self.resolve(header)["schema"]
                self._validator(schema).validate(value)
        content = response.get("content")
        if method == "HEAD" or content is None:
            assert not body or content is not None, f"{where}: unexpected body"
            return
        media = headers.get("Content-Type", "").split(";")[0].strip()
        assert media in content, f"{where}: content type {media!r} not in {sorted(content)}"
        schema = content[media]["schema"]
        if media == "application/json":
            instance: Any = json.loads(body)
        elif media in _TEXT_TYPES:
            instance = body.decode("utf-8")
        else:
            return
        errors = sorted(self._validator(schema).iter_errors(instance), key=str)
        assert not errors, f"{where}: body does not match the spec: {errors[0].message}"
