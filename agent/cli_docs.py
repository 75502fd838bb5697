"""Generate docs/cli.md from the argparse parser, so the CLI reference cannot drift.

python -m agent.cli_docs --write     # rewrites docs/cli.md
python -m agent.cli_docs --check     # exit 1 if the committed file is stale
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterator
from pathlib import Path

from agent.docgen import generated_doc_main

REGENERATE = "python -m agent.cli_docs --write"
DOC = Path(__file__).resolve().parent.parent / "docs" / "cli.md"
_WIDTH = "90"  # argparse wraps to $COLUMNS: fixed, so the output is the same everywhere


def _commands(
    parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()
) -> Iterator[tuple[tuple[str, ...], str, argparse.ArgumentParser]]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help or "" for a in action._choices_actions}
            for name, sub in action.choices.items():
                yield (*prefix, name), helps.get(name, ""), sub
                yield from _commands(sub, (*prefix, name))


def reference() -> str:
    """The whole of docs/cli.md."""
    old = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = _WIDTH
    try:
        from agent.cli import build_parser

        parser = build_parser()
        out = [
            "# Command-line reference",
            "",
            f"Generated from the argparse parser by `{REGENERATE}`; a test fails when",
            "it is stale. Exit codes: 0 ok, 1 runtime failure, 2 usage or config error,",
            "70 internal error, 126/127 `exec` cannot run or find the command, 130",
            "interrupted (`exec` otherwise exits with the command's status). Each error is",
            "one line on stderr; `--debug` adds the traceback. `-c/--config` and `--debug`",
            "are accepted before or after the command.",
            "",
            "| command | what it does |",
            "|---|---|",
        ]
        commands = list(_commands(parser))
        for words, text, _ in commands:
            anchor = "-".join(words)
            out.append(f"| [`{' '.join(words)}`](#{anchor}) | {text} |")
        out += ["", "## secrets-agent", "", "```text", parser.format_help().rstrip(), "```"]
        for words, _, sub in commands:
            out += ["", f"## {'-'.join(words)}", "", "```text", sub.format_help().rstrip(), "```"]
        return "\n".join(out) + "\n"
    finally:
        if old is None:
            os.environ.pop("COLUMNS", None)
        else:
            os.environ["COLUMNS"] = old


def main(argv: list[str] | None = None) -> int:
    return generated_doc_main(argv, module="agent.cli_docs", doc=DOC, reference=reference)


if __name__ == "__main__":
    sys.exit(main())
