"""Allow ``python -m agent``."""

from __future__ import annotations

from agent.cli import entrypoint

entrypoint()
