"""The secret lifecycle: ``prune`` (retention, and purging deleted secrets after their
recovery window), ``delete NAME`` with a recovery window, and ``restore NAME``."""

from __future__ import annotations

import argparse
import time
from typing import Any

from agent import deletion
from agent.commands.common import EXIT_OK, EXIT_USAGE, err, load, run_async, with_core
from agent.config import AgentConfig
from agent.config_scalars import parse_duration
from agent.core import Core
from agent.errors import BadRequest, NotFound
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

    async def go(core: Core) -> tuple[dict[str, list[str]], dict[str, int]]:
        done: dict[str, list[str]] = {}
        purged: dict[str, int] = {}
        now = time.time()
        for name in names or await core.store.list_names():
            try:
                state = await core.store.read_stages(name)
                if deletion.purge_due(state.stages, now):
                    # The recovery window has ended: every version goes, for good.
                    purged[name] = -1 if args.dry_run else await deletion.purge(core.writer(), name)
                    continue
                done[name] = await prune(
                    core.store, name, policy, now=utcnow(), dry_run=args.dry_run
                )
            except NotFound:
                err(f"prune: secret {name!r} does not exist")
        return done, purged

    done, purged = run_async(with_core(config, go))
    if not args.dry_run:
        _audit(
            config,
            "secret_purged",
            {n: f"{c} version(s); its recovery window had ended" for n, c in purged.items()},
        )
    verb = "would prune" if args.dry_run else "pruned"
    for name, ids in done.items():
        if ids:
            print(f"{name}: {verb} {len(ids)} version(s): {' '.join(ids)}")
    for name, count in purged.items():
        if args.dry_run:
            print(f"{name}: would purge (its recovery window has ended)")
        else:
            print(f"{name}: purged, {count} version(s) deleted for good")
    total = sum(len(ids) for ids in done.values())
    print(f"{verb} {total} version(s) of {len(done)} secret(s)")
    return EXIT_OK


def _audit(config: AgentConfig, event: str, names: dict[str, str]) -> None:
    """One ``event`` record per secret name (with its reason): who deleted what, when."""
    from agent.audit import AuditLog

    if not names:
        return
    audit = AuditLog.from_config(config.audit, base_dir=config.base_dir, stream_fd=2)
    for name, reason in names.items():
        audit.record(event, secret=name, outcome="ok", reason=reason)
    run_async(audit.aclose())


def cmd_delete(args: argparse.Namespace) -> int:
    """Schedule a secret for deletion after a recovery window (or purge it now)."""
    config = load(args)
    name = validate_name(args.name)
    if args.force_delete_without_recovery and args.recovery_window is not None:
        err("delete: --recovery-window and --force-delete-without-recovery exclude each other")
        return EXIT_USAGE
    window = deletion.DEFAULT_WINDOW
    if args.recovery_window is not None:
        try:
            window = parse_duration(args.recovery_window)
        except (TypeError, ValueError) as exc:
            raise BadRequest(f"--recovery-window: {exc}") from None
        if window < 1:
            raise BadRequest("--recovery-window: 1s or more (or --force-delete-without-recovery)")

    async def go(core: Core) -> float | int:
        writer = core.writer()
        if args.force_delete_without_recovery:
            await core.store.read_stages(name)  # SecretNotFound for a missing secret
            return await deletion.purge(writer, name)
        return await deletion.delete(writer, name, window=window)

    result = run_async(with_core(config, go))
    if args.force_delete_without_recovery:
        _audit(config, "secret_purged", {name: f"{result} version(s); no recovery window"})
        print(f"{name}: deleted for good, {result} version(s) removed; no recovery")
    else:
        _audit(config, "secret_deleted", {name: f"recoverable until {deletion.iso(result)}"})
        print(
            f"{name}: scheduled for deletion; 'secrets-agent restore {name}' until "
            f"{deletion.iso(result)}, then 'secrets-agent prune' purges it"
        )
    return EXIT_OK


def cmd_restore(args: argparse.Namespace) -> int:
    """Cancel the deletion of a secret within its recovery window."""
    config = load(args)
    name = validate_name(args.name)

    async def go(core: Core) -> dict[str, str]:
        return dict((await deletion.restore(core.writer(), name)).stages)

    stages = run_async(with_core(config, go))
    _audit(config, "secret_restored", {name: "restored within its recovery window"})
    print(f"{name}: restored: " + " ".join(f"{s}={v}" for s, v in sorted(stages.items())))
    return EXIT_OK


def register(sub: Any) -> None:
    """Add ``prune``, ``delete`` and ``restore`` to the CLI."""
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

    p = sub.add_parser(
        "delete",
        help="schedule a secret for deletion (restore it within the recovery window)",
        description=(
            "Schedule a secret for deletion, as Secrets Manager's DeleteSecret does: get "
            "and running agents treat it as gone at once, writes and rotation are refused, "
            "'restore' puts it back until the recovery window ends, and after that 'prune' "
            "removes every version for good."
        ),
    )
    p.add_argument("name", metavar="NAME", help="the secret's name")
    p.add_argument(
        "--recovery-window",
        metavar="DURATION",
        help="how long it can be restored (default 30d; e.g. 7d, 12h)",
    )
    p.add_argument(
        "--force-delete-without-recovery",
        action="store_true",
        help="delete every version now, for good (no restore)",
    )
    p.set_defaults(func=cmd_delete)

    p = sub.add_parser(
        "restore",
        help="cancel a scheduled deletion (within the recovery window)",
        description=(
            "Cancel the scheduled deletion of a secret: every stage goes back to the "
            "version it was on. Refused once the recovery window has ended."
        ),
    )
    p.add_argument("name", metavar="NAME", help="the secret's name")
    p.set_defaults(func=cmd_restore)
