"""The ``secrets-agent`` command line: parse, dispatch, map errors to exit codes.

Exit codes: 0 ok, 1 runtime failure, 2 usage or config error. ``-c/--config``
is accepted before or after the subcommand.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import agent
from agent.commands import admin, audit, keys_ops, lifecycle, render, rotate, secrets
from agent.commands.common import EXIT_FAILURE, EXIT_USAGE, err
from agent.errors import AgentError, BadRequest, ConfigError

#: Modules whose ``register(subparsers)`` adds subcommands, in help order.
COMMAND_MODULES = [admin, secrets, lifecycle, rotate, keys_ops, render, audit]


def _add_config_flag(parser: argparse.ArgumentParser, *, default: object) -> None:
    parser.add_argument(
        "-c",
        "--config",
        default=default,
        help="config file (default: $SECRETS_AGENT_CONFIG, then the default location)",
    )


def _subparsers(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    out: list[argparse.ArgumentParser] = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            out.extend(action.choices.values())
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="secrets-agent",
        description="A secrets sidecar: envelope-encrypted secrets served on a Unix socket, "
        "rendered to tmpfs, refreshed on rotation.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {agent.__version__}")
    _add_config_flag(parser, default=None)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in COMMAND_MODULES:
        module.register(sub)
    # Accept -c after the subcommand too, without overriding one given before it.
    for subparser in _subparsers(parser):
        _add_config_flag(subparser, default=argparse.SUPPRESS)
        for nested in _subparsers(subparser):
            _add_config_flag(nested, default=argparse.SUPPRESS)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; return its exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse: --help/--version exit 0, usage errors 2
        return int(exc.code) if isinstance(exc.code, int) else EXIT_USAGE
    try:
        code: int = args.func(args)
        return code
    except ConfigError as exc:
        err(f"config error: {exc.message}")
        return EXIT_USAGE
    except BadRequest as exc:
        err(exc.message)
        return EXIT_USAGE
    except AgentError as exc:
        err(exc.message)
        return EXIT_FAILURE
    except OSError as exc:
        err(f"{exc.strerror or exc}: {exc.filename or ''}".rstrip(": "))
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return 130


def entrypoint() -> None:
    """Console-script entry point."""
    sys.exit(main())
