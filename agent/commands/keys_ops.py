"""``secrets-agent reencrypt``."""

from __future__ import annotations

import argparse
from typing import Any

from agent.commands.common import EXIT_OK, EXIT_USAGE, Progress, err, load, run_async, with_core
from agent.core import Core
from agent.reencrypt import Reencryptor, ReencryptReport, target_recipients
from agent.types import validate_name


def cmd_reencrypt(args: argparse.Namespace) -> int:
    if not args.names and not args.store_wide:
        err("reencrypt: name secrets, or pass --store-wide for every secret")
        return EXIT_USAGE
    config = load(args)
    names = [validate_name(n) for n in args.names] if args.names else None

    async def go(core: Core) -> ReencryptReport:
        targets = target_recipients(
            core, add=args.add_recipient or [], remove=args.remove_recipient or []
        )
        listed = names if names is not None else await core.store.list_names()
        total = 0
        for name in listed:
            total += len(await core.store.list_versions(name))
        progress = Progress(total, "reencrypt")
        try:
            return await Reencryptor(core, targets).run(listed, step=progress.step)
        finally:
            progress.close()

    report = run_async(with_core(config, go))
    wraps = ", ".join(f"{p}: {n}" for p, n in sorted(report.wraps.items())) or "none"
    print(
        f"{report.versions} versions: {report.rewrapped} rewrapped, {report.skipped} already "
        f"current, {report.conflicts} changed concurrently (run again); "
        f"{report.datakey_lookups} data-key lookups (cached after the first), wraps {wraps}"
    )
    return EXIT_OK


def register(sub: Any) -> None:
    p = sub.add_parser("reencrypt", help="rewrap data keys under the current master keys")
    p.add_argument("names", nargs="*", metavar="NAME")
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
