"""``secrets-agent audit verify FILE...``: check the audit log's hash chain."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from agent.audit import verify
from agent.commands.common import EXIT_FAILURE, EXIT_OK, err


def cmd_verify(args: argparse.Namespace) -> int:
    """Print ``ok: N records`` and exit 0, or name the first broken link and exit 1."""
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
    print(f"ok: {verdict.records} records")
    print(f"head: sha256:{verdict.head}")
    return EXIT_OK


def register(sub: Any) -> None:
    """Add ``audit verify`` to the parser."""
    audit = sub.add_parser("audit", help="audit log tools")
    audit_sub = audit.add_subparsers(dest="audit_command", required=True, metavar="COMMAND")
    p = audit_sub.add_parser(
        "verify",
        help="check the hash chain of an audit log (give rotated files first, oldest first)",
    )
    p.add_argument("files", nargs="+", metavar="FILE")
    p.set_defaults(func=cmd_verify)
