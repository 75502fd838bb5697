"""What subcommands share: loading the config, running async code, printing."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any, TextIO, TypeVar

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


class _Lines:
    """A text stream that turns tqdm's carriage-return redraws into one line each.

    Off a terminal (a CI log, ``2> file``) a redrawn bar would be one long
    line of ``\r``-separated states; each state on its own line reads well.
    """

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream

    def write(self, text: str) -> int:
        line = text.strip("\r\n")
        if line.strip():
            self.stream.write(line + "\n")
        return len(text)

    def flush(self) -> None:
        self.stream.flush()


class Progress:
    """Progress of a bulk command on stderr, with rate and ETA (tqdm).

    On a terminal the bar redraws in place; elsewhere a line is written at
    most every 5 seconds, and at the end.
    """

    def __init__(self, total: int, label: str) -> None:
        from tqdm import tqdm

        tty = sys.stderr.isatty()
        self.done = 0
        self._bar = tqdm(
            total=total,
            desc=label,
            unit="secret",
            file=sys.stderr if tty else _Lines(sys.stderr),
            mininterval=0.1 if tty else 5.0,
            dynamic_ncols=tty,
            ncols=None if tty else 100,
            ascii=not tty,
            leave=True,
        )

    def step(self, n: int = 1) -> None:
        self.done += n
        self._bar.update(n)

    def close(self) -> None:
        self._bar.close()
