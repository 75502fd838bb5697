"""Shared fixtures: real servers (tests/servers.py) and agent building blocks."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.agentenv import AgentEnv, agent_dir
from tests.servers import *  # noqa: F403


@pytest.fixture
def env() -> Iterator[AgentEnv]:
    """An initialised agent directory (config, keyring, store) in a short temp path."""
    with agent_dir() as e:
        yield e
