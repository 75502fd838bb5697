"""Shared fixtures: real servers (tests/servers.py) and agent building blocks."""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.agentenv import AgentEnv, agent_dir
from tests.servers import *  # noqa: F403

_RUN_PREFIX = "pytest-run-"
_RUN_MAX_AGE = 86400.0


def pytest_configure(config: pytest.Config) -> None:
    """Give each run a temp root of its own unless --basetemp names one.

    pytest's default root (/tmp/pytest-of-USER) keeps the last three runs and
    deletes older ones when a run starts, so on a machine where several suites
    run at once a new run deleted the data directory of a server (etcd) that
    another, still running, suite had started there.
    """
    if config.option.basetemp is not None or hasattr(config, "workerinput"):
        return
    root = Path(tempfile.gettempdir())
    now = time.time()
    for old in root.glob(_RUN_PREFIX + "*"):  # our own runs from long ago
        try:
            if now - old.stat().st_mtime > _RUN_MAX_AGE:
                shutil.rmtree(old, ignore_errors=True)
        except OSError:
            continue
    config.option.basetemp = tempfile.mkdtemp(prefix=_RUN_PREFIX, dir=root)


@pytest.fixture
def env() -> Iterator[AgentEnv]:
    """An initialised agent directory (config, keyring, store) in a short temp path."""
    with agent_dir() as e:
        yield e
