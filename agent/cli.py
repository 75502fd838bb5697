"""The ``secrets-agent`` command line: parse, dispatch, map errors to exit codes.

Every expected error prints one line on stderr (``secrets-agent: <what>``)
and exits with a documented status; a traceback is printed only with
``--debug`` (or ``SECRETS_AGENT_DEBUG=1``):

====  =====================================================================
0     ok
1     a runtime failure: a secret, version or key not found, access denied,
      the store, a key provider or the agent unavailable, a decryption
      refused, a file that cannot be read or written
2     a usage or config error: bad arguments, an invalid config (naming the
      file, line and YAML path), a malformed name or value
70    an internal error (a bug): its type is printed; ``--debug`` shows where
126   ``exec``: the command cannot be run (not executable)
127   ``exec``: the command is not found
130   interrupted (Ctrl-C)
====  =====================================================================

``exec`` otherwise exits with the command's own status. ``-c/--config`` and
``--debug`` are accepted before or after the subcommand.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from collections.abc import Sequence

import agent
from agent.client import BadRequestError, ClientError
from agent.commands import admin, audit, keys_ops, lifecycle, render, rotate, secrets
from agent.commands.common import EXIT_FAILURE, EXIT_USAGE, err
from agent.errors import AgentError, BadRequest, ConfigError
from agent.fsowner import denied_suffix

#: A bug: an exception no command expects (sysexits' EX_SOFTWARE).
EXIT_INTERNAL = 70

#: Modules whose ``register(subparsers)`` adds subcommands, in help order.
COMMAND_MODULES = [admin, secrets, lifecycle, rotate, keys_ops, render, audit]


def _add_config_flag(parser: argparse.ArgumentParser, *, default: object) -> None:
    parser.add_argument(
        "-c",
        "--config",
        default=default,
        help="config file (default: $SECRETS_AGENT_CONFIG, then the default location)",
    )
    parser.add_argument(
        "--debug",
        action="store_true",
        default=False if default is None else argparse.SUPPRESS,
        help="print a traceback with an error (also SECRETS_AGENT_DEBUG=1)",
    )


def _subparsers(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    """The parser's subcommands; each without a description gets its one-line help as one."""
    out: list[argparse.ArgumentParser] = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help for a in action._choices_actions}
            for name, sub in action.choices.items():
                if sub.description is None and helps.get(name):
                    sub.description = str(helps[name]).capitalize() + "."
                out.append(sub)
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
    debug = bool(getattr(args, "debug", False)) or os.environ.get("SECRETS_AGENT_DEBUG") == "1"
    try:
        code: int = args.func(args)
        return code
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        if debug:
            traceback.print_exc()
        return failure(_leaf(exc))


def _leaf(exc: BaseException) -> BaseException:
    """The first real error inside an exception group (a TaskGroup wraps what its tasks raise)."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return exc


def failure(exc: BaseException) -> int:
    """Print the one line for ``exc`` and return its exit status (see the module docstring)."""
    if isinstance(exc, ConfigError):
        err(f"config error: {exc.message}")
        return EXIT_USAGE
    if isinstance(exc, (BadRequest, BadRequestError)):
        err(exc.message if isinstance(exc, AgentError) else str(exc))
        return EXIT_USAGE
    if isinstance(exc, AgentError):
        err(exc.message)
        return EXIT_FAILURE
    if isinstance(exc, ClientError):
        err(str(exc))
        return EXIT_FAILURE
    if isinstance(exc, OSError):
        err(f"{exc.strerror or exc}: {exc.filename or ''}".rstrip(": ") + denied_suffix(exc))
        return EXIT_FAILURE
    # Not the exception's message: an unexpected error may carry anything.
    err(
        f"internal error ({type(exc).__module__}.{type(exc).__qualname__}); "
        "run again with --debug for the traceback, and please report it"
    )
    return EXIT_INTERNAL


def entrypoint() -> None:
    """Console-script entry point."""
    sys.exit(main())
