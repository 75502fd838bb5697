"""The command line of a generated reference page (``python -m agent.X_docs``).

Prints the page, rewrites it (``--write``), or exits 1 when the committed
copy is stale (``--check``, what the tests run).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path


def generated_doc_main(
    argv: list[str] | None, *, module: str, doc: Path, reference: Callable[[], str]
) -> int:
    parser = argparse.ArgumentParser(prog=f"python -m {module}")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--write", action="store_true", help=f"rewrite {doc.name}")
    mode.add_argument("--check", action="store_true", help="exit 1 if it is stale")
    args = parser.parse_args(argv)
    text = reference()
    if args.write:
        doc.write_text(text, encoding="utf-8")
    elif args.check:
        if not doc.exists() or doc.read_text(encoding="utf-8") != text:
            print(
                f"{doc} is stale; regenerate it with: python -m {module} --write", file=sys.stderr
            )
            return 1
    else:
        print(text, end="")
    return 0
