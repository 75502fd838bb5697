"""``secrets-agent audit verify FILE...``: check the audit log's hash chain."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from agent.audit import verify
from agent.commands.common import EXIT_FAILURE, EXIT_OK, err


def cmd_verify(args: argparse.Namespace) -> int:
    """Print ``ok: N records`` and exit 0, or name the first broken link and exit 1.

    A directory stands for every audit file in it, in chain order (rotated
    files are ordered by their first record, whatever their names).
    """
    paths = [Path(p) for p in args.files]
    try:
        verdict = verify(paths)
    except OSError as exc:
        err(f"cannot read {exc.filename}: {exc.strerror}")
        return EXIT_FAILURE
    if not verdict.ok:
        print(f"broken: {verdict.file}:{verdict.line}: {verdict.reason}")
        print(f"ok before it: {verdict.records} records")
        return EXIT_FAILURE
    files = f" in {verdict.files} files" if verdict.files > 1 else ""
    print(f"ok: {verdict.records} records{files}")
    print(f"head: sha256:{verdict.head}")
    return EXIT_OK


def register(sub: Any) -> None:
    """Add ``audit verify`` to the parser."""
    audit = sub.add_parser("audit", help="audit log tools")
    audit_sub = audit.add_subparsers(dest="audit_command", required=True, metavar="COMMAND")
    p = audit_sub.add_parser(
        "verify",
        help="check the hash chain of an audit log (files oldest first, or a directory)",
    )
    p.add_argument(
        "files",
        nargs="+",
        metavar="FILE_OR_DIR",
        help="audit log files (rotated ones oldest first), or their directory",
    )
    p.set_defaults(func=cmd_verify)
