"""What subcommands share: loading the config, running async code, printing."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

from agent.config import AgentConfig, default_config_path, load_config
from agent.core import Core
from agent.errors import ConfigError

T = TypeVar("T")
EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2


def config_path(args: argparse.Namespace) -> Path:
    """Flag > ``$SECRETS_AGENT_CONFIG`` > the default location."""
    if getattr(args, "config", None):
        return Path(args.config)
    env = os.environ.get("SECRETS_AGENT_CONFIG")
    return Path(env) if env else default_config_path()


def load(args: argparse.Namespace) -> AgentConfig:
    """Load and validate the config the arguments point at (raises ConfigError)."""
    path = config_path(args)
    if not path.exists():
        raise ConfigError(
            f"no config at {path}; create one with `secrets-agent init` or pass -c/--config"
        )
    return load_config(path)


def run_async(main: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(main)


def event_loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's event loop when it is installed (the ``uvloop`` extra), else asyncio's.

    ``SECRETS_AGENT_UVLOOP=0`` keeps asyncio's loop even then (to compare
    the two, or to rule uvloop out).
    """
    if os.environ.get("SECRETS_AGENT_UVLOOP", "1") == "0":
        return None
    try:
        import uvloop
    except ImportError:
        return None
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


async def with_core(config: AgentConfig, fn: Callable[[Core], Awaitable[T]]) -> T:
    """Build the core, run ``fn`` with it, and close it whatever happens."""
    core = Core.build(config)
    try:
        return await fn(core)
    finally:
        await core.aclose()


def err(message: str) -> None:
    """Print a message for the user on stderr."""
    print(f"secrets-agent: {message}", file=sys.stderr)


class Progress:
    """A one-line progress bar on stderr (only redrawn on a terminal)."""

    def __init__(self, total: int, label: str) -> None:
        self.total = total
        self.label = label
        self.done = 0
        self.tty = sys.stderr.isatty()

    def step(self, n: int = 1) -> None:
        self.done += n
        if self.tty and (self.done == self.total or self.done % 25 == 0):
            width = 30
            filled = width * self.done // max(1, self.total)
            bar = "#" * filled + "-" * (width - filled)
            print(f"\r{self.label} [{bar}] {self.done}/{self.total}", end="", file=sys.stderr)

    def close(self) -> None:
        if self.tty:
            print(file=sys.stderr)
        print(f"{self.label}: {self.done}/{self.total} done", file=sys.stderr)
