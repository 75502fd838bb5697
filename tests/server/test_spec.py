"""docs/openapi.yaml is valid, shipped unchanged, served, and lists exactly the app's routes."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from openapi_spec_validator import validate

from agent.config import TcpListenConfig
from agent.server.app import build_app
from agent.server.tcp import build_tcp_app
from tests.server.conftest import Served, ServeUnix, World
from tests.server.spec import SPEC_PATH, Spec

SHIPPED = Path(__file__).resolve().parents[2] / "agent" / "openapi.yaml"


def test_the_spec_is_valid_openapi_3_1() -> None:
    doc = yaml.safe_load(SPEC_PATH.read_text())
    assert doc["openapi"].startswith("3.1")
    validate(doc)


def test_the_packaged_copy_is_identical_to_the_docs() -> None:
    assert SHIPPED.read_bytes() == SPEC_PATH.read_bytes(), (
        "agent/openapi.yaml differs from docs/openapi.yaml: cp docs/openapi.yaml agent/openapi.yaml"
    )


def _routes(world: World, tcp: bool) -> set[tuple[str, str]]:
    if tcp:
        cfg = TcpListenConfig(tokens={"app": "env:SA_SPEC_TOKEN"})
        app = build_tcp_app(world.state, cfg, base_dir=None)
    else:
        app = build_app(world.state)
    return {
        (route.resource.canonical, route.method.lower())
        for route in app.router.routes()
        if route.resource is not None and route.method != "HEAD"
    }


async def test_every_route_of_both_listeners_is_in_the_spec_and_nothing_else(
    world: World, spec: Spec, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SA_SPEC_TOKEN", "x")
    documented = {(path, method) for path, item in spec.doc["paths"].items() for method in item}
    assert _routes(world, tcp=False) == documented
    assert _routes(world, tcp=True) == documented


async def test_the_spec_is_served_at_v1_openapi_yaml(serve_unix: ServeUnix) -> None:
    api: Served = await serve_unix()
    answer = await api.get("/v1/openapi.yaml")
    assert answer.headers["Content-Type"].startswith("application/yaml")
    assert answer.body == SHIPPED.read_bytes()
