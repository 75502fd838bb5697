"""Shared fixtures: real servers (tests/servers.py) and agent building blocks."""

from __future__ import annotations

from tests.servers import *  # noqa: F403
