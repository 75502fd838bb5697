"""``secrets-agent prune``: apply the retention policy to stored versions."""

from __future__ import annotations

import argparse
from typing import Any

from agent.commands.common import EXIT_OK, err, load, run_async, with_core
from agent.core import Core
from agent.errors import NotFound
from agent.retention import RetentionPolicy, prune
from agent.types import utcnow, validate_name


def cmd_prune(args: argparse.Namespace) -> int:
    """Delete unstaged versions beyond the retention policy (staged ones never)."""
    config = load(args)
    if not args.names and not args.all:
        err("prune: name secrets, or pass --all for every secret")
        return 2
    if args.keep is not None and args.keep < 0:
        err("prune: --keep takes a number of versions, 0 or more")
        return 2
    names = [validate_name(n) for n in args.names]
    retention = config.retention
    policy = RetentionPolicy(
        args.keep if args.keep is not None else retention.keep_unstaged,
        retention.max_age,
    )

    async def go(core: Core) -> dict[str, list[str]]:
        done: dict[str, list[str]] = {}
        for name in names or await core.store.list_names():
            try:
                done[name] = await prune(
                    core.store, name, policy, now=utcnow(), dry_run=args.dry_run
                )
            except NotFound:
                err(f"prune: secret {name!r} does not exist")
        return done

    done = run_async(with_core(config, go))
    verb = "would prune" if args.dry_run else "pruned"
    for name, ids in done.items():
        if ids:
            print(f"{name}: {verb} {len(ids)} version(s): {' '.join(ids)}")
    total = sum(len(ids) for ids in done.values())
    print(f"{verb} {total} version(s) of {len(done)} secret(s)")
    return EXIT_OK


def register(sub: Any) -> None:
    """Add ``prune`` to the CLI."""
    p = sub.add_parser(
        "prune",
        help="delete old unstaged versions (retention)",
        description=(
            "Delete unstaged versions beyond retention.keep_unstaged (newest kept) or older "
            "than retention.max_age. Versions that carry a stage are never deleted. Writes "
            "(put, import, rotation) prune the secret they wrote on their own."
        ),
    )
    p.add_argument("names", nargs="*", metavar="NAME", help="secrets to prune (or --all)")
    p.add_argument("--all", action="store_true", help="every secret in the store")
    p.add_argument("--keep", type=int, help="unstaged versions to keep (overrides the config)")
    p.add_argument("--dry-run", action="store_true", help="only say what would be deleted")
    p.set_defaults(func=cmd_prune)
