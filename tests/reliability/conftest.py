"""Scale and tallies for the reliability suite.

``RELIABILITY_FULL=1`` runs the full form (scale 20), ``RELIABILITY_SCALE=N``
any other; the reduced form (scale 1) is what CI runs. With
``RELIABILITY_REPORT=path`` the session writes its tallies (fuzzed inputs,
fault scenarios survived, crashes) there as JSON, for docs/reliability.md.
The HTTP tests (``test_http_*.py``) use ``ports``: an agent with the token
port and the metrics port on; their full forms run with
``RELIABILITY_FULL=1`` too.
"""

from __future__ import annotations

import collections
import json
import os
import secrets
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from tests.agentenv import AgentEnv
from tests.reliability.agentproc import free_port

SCALE = int(
    os.environ.get("RELIABILITY_SCALE") or (20 if os.environ.get("RELIABILITY_FULL") else 1)
)
TALLY: collections.Counter[str] = collections.Counter()


def scaled(n: int) -> int:
    """``n`` times the suite's scale."""
    return n * SCALE


@pytest.fixture(scope="session", autouse=True)
def _report() -> Iterator[None]:
    yield
    path = os.environ.get("RELIABILITY_REPORT")
    if path:
        with open(path, "w", encoding="utf-8") as f:
            json.dump({"scale": SCALE, **dict(sorted(TALLY.items()))}, f, indent=1)


# ---------------------------------------------- the HTTP tests' agent (ports on)

TOKEN_ENV = "SA_RELIABILITY_TOKEN"


@dataclass
class Ports:
    tcp: int
    metrics: int
    token: str


@pytest.fixture
def ports(env: AgentEnv, monkeypatch: pytest.MonkeyPatch) -> Iterator[Ports]:
    """Configure ``env`` with a token port and a metrics port on free loopback ports."""
    token = "tok-" + secrets.token_hex(16)
    monkeypatch.setenv(TOKEN_ENV, token)
    tcp, metrics = free_port(), free_port()
    env.configure(
        listen={
            "socket": "./agent.sock",
            "tcp": {"address": f"127.0.0.1:{tcp}", "tokens": {"app": f"env:{TOKEN_ENV}"}},
        },
        metrics={"listen": f"127.0.0.1:{metrics}"},
        access=[
            {"secrets": ["*"], "uids": [os.getuid()]},
            {"secrets": ["app/*"], "token": "app"},
        ],
    )
    yield Ports(tcp, metrics, token)
