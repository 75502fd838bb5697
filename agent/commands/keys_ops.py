"""``secrets-agent reencrypt``: rewrap data keys under the current master keys."""

from __future__ import annotations

import argparse
from typing import Any

from agent.commands.common import (
    EXIT_FAILURE,
    EXIT_OK,
    EXIT_USAGE,
    Progress,
    err,
    load,
    run_async,
    with_core,
)
from agent.core import Core
from agent.errors import NotFound
from agent.reencrypt import Reencryptor, ReencryptReport, target_recipients
from agent.types import validate_name


async def _count_versions(core: Core, names: list[str]) -> int:
    total = 0
    for name in names:
        try:
            total += len(await core.store.list_versions(name))
        except NotFound:
            continue
    return total


def cmd_reencrypt(args: argparse.Namespace) -> int:
    """Rewrap every version of the named secrets (or the whole store); resumable."""
    if not args.names and not args.store_wide:
        err("reencrypt: name secrets, or pass --store-wide for every secret")
        return EXIT_USAGE
    if args.names and args.store_wide:
        err("reencrypt: name secrets or pass --store-wide, not both")
        return EXIT_USAGE
    config = load(args)
    names = [validate_name(n) for n in args.names] if args.names else None

    async def go(core: Core) -> tuple[list[str], ReencryptReport]:
        targets = target_recipients(
            core, add=args.add_recipient or [], remove=args.remove_recipient or []
        )
        listed = names if names is not None else await core.store.list_names()
        progress = Progress(await _count_versions(core, listed), "reencrypt")
        try:
            return targets, await Reencryptor(core, targets).run(listed, step=progress.step)
        finally:
            progress.close()

    targets, report = run_async(with_core(config, go))
    _print(report, targets)
    return EXIT_OK if report.complete else EXIT_FAILURE


def _print(report: ReencryptReport, targets: list[str]) -> None:
    wraps = ", ".join(f"{p}: {n}" for p, n in sorted(report.wraps.items())) or "none"
    print(
        f"{report.versions} versions: {report.rewrapped} rewrapped, {report.skipped} already "
        f"current, {report.conflicts} changed concurrently (run again), {report.failed} failed; "
        f"{report.datakey_lookups} data-key lookups (cached after the first), wraps {wraps}; "
        f"recipients now: {', '.join(targets)}"
    )
    if report.signed:
        print(f"{report.signed} stage maps without proof signed as they stood")
    if report.unproven:
        print(
            f"{report.unproven} stage maps without proof left unsigned: check them with "
            "`describe`, then sign them with store.accept_unproven_stages: true or "
            "`promote NAME CURRENT <id>`"
        )
    for failure in report.failures:
        err(f"reencrypt: {failure}")
    if report.failed > len(report.failures):
        err(f"reencrypt: ... and {report.failed - len(report.failures)} more")


def register(sub: Any) -> None:
    """Add ``reencrypt`` to the CLI."""
    p = sub.add_parser(
        "reencrypt",
        help="rewrap data keys under the current master keys",
        description=(
            "Rewrap the data key of every version for the target recipients (write_keys, "
            "plus --add-recipient, minus --remove-recipient). Payloads are never decrypted; "
            "interrupted runs resume when run again. Exit 1 if some versions were left as "
            "they were (changed concurrently, or unreadable)."
        ),
    )
    p.add_argument("names", nargs="*", metavar="NAME", help="secrets to rewrap (or --store-wide)")
    p.add_argument("--store-wide", action="store_true", help="every secret in the store")
    p.add_argument(
        "--add-recipient",
        action="append",
        metavar="PROVIDER",
        help="also wrap for this provider (a name under 'keys')",
    )
    p.add_argument(
        "--remove-recipient",
        action="append",
        metavar="PROVIDER",
        help="drop this provider's recipient",
    )
    p.set_defaults(func=cmd_reencrypt)
