"""``rotate NAME``: run (or resume) a rotation now; and the rotation part of ``describe``."""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

from agent.client import ClientError, SecretsClient
from agent.commands.common import EXIT_FAILURE, EXIT_OK, err, load, run_async, with_core
from agent.config import AgentConfig, RotationConfig
from agent.core import Core
from agent.errors import AgentError, BadRequest, ConfigError, SecretNotFound
from agent.registry import load_backend
from agent.rotation.base import ROTATORS, RotationFailed, Rotator
from agent.rotation.engine import ADHOC, RotationEngine, RotationResult, StepUnavailable
from agent.rotation.schedule import iso
from agent.rotation.scheduler import check_due, schedule_of
from agent.types import PENDING, validate_name


def rule_for(config: AgentConfig, name: str) -> RotationConfig | None:
    """The ``rotation:`` rule for ``name``, if the config has one."""
    return next((r for r in config.rotation if r.secret == name), None)


def parse_params(pairs: list[str]) -> dict[str, Any]:
    """``k=v`` pairs; a value that parses as JSON (40, true, [..]) is taken as such."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise BadRequest(f"--param expects KEY=VALUE, got {key!r}")
        try:
            out[key] = json.loads(value)
        except ValueError:
            out[key] = value
    return out


def _rotator_and_params(
    config: AgentConfig, args: argparse.Namespace
) -> tuple[str, dict[str, Any], RotationConfig | None]:
    rule = rule_for(config, args.name)
    name = args.rotator or (rule.rotator if rule is not None else None)
    if name is None:
        raise BadRequest(
            f"no rotation rule for {args.name!r} in the config; pass --rotator "
            f"({', '.join(sorted(ROTATORS))})"
        )
    if name not in ROTATORS:
        raise BadRequest(f"unknown rotator {name!r} (known: {', '.join(sorted(ROTATORS))})")
    params = dict(rule.params) if rule is not None and rule.rotator == name else {}
    params.update(parse_params(args.param))
    return name, params, rule


def cmd_rotate(args: argparse.Namespace) -> int:
    config = load(args)
    validate_name(args.name)
    rotator_name, params, rule = _rotator_and_params(config, args)
    try:
        rotator: Rotator = load_backend(ROTATORS, rotator_name, "rotator")(params)
    except ConfigError as exc:
        raise BadRequest(f"rotator {rotator_name!r}: {exc.message}") from None
    from agent.audit import AuditLog

    audit = AuditLog.from_config(config.audit, base_dir=config.base_dir, stream_fd=2)

    async def go(core: Core) -> Any:
        engine = RotationEngine(core.writer(), core.resolver, metrics=core.metrics, audit=audit)
        token = None
        if rule is not None:
            # If the scheduled rotation is due, this is it (same token as the agents').
            try:
                due = await check_due(core.store, args.name, schedule_of(rule))
                token = due.token if due.run else None
            except SecretNotFound:
                token = None
        try:
            if args.dry_run:
                return await engine.plan(args.name, token=token)
            return await engine.rotate(
                args.name,
                rotator,
                token=token,
                params=params,
                label=rule.secret if rule is not None else ADHOC,
            )
        finally:
            await rotator.aclose()
            await audit.aclose()

    try:
        result = run_async(with_core(config, go))
    except (RotationFailed, StepUnavailable) as exc:
        kind = "failed" if isinstance(exc, RotationFailed) else "stopped (transient)"
        err(
            f"rotation of {args.name} {kind} at step {exc.step or '?'}: {exc.message}; "
            "CURRENT is unchanged, run rotate again to resume"
        )
        return EXIT_FAILURE
    if args.dry_run:
        print(result.describe())
        return EXIT_OK
    assert isinstance(result, RotationResult)
    if result.outcome == "rotated":
        resumed = " (resumed)" if result.resumed else ""
        print(
            f"{args.name}: rotated to version {result.token}{resumed}; "
            f"steps {' '.join(result.steps)}"
        )
    else:
        print(f"{args.name}: version {result.token} is already done ({result.outcome})")
    return EXIT_OK


async def rotation_state(core: Core, config: AgentConfig, name: str) -> dict[str, Any] | None:
    """The rotation part of ``describe``: rule, pending token, next time, last result."""
    rule = rule_for(config, name)
    try:
        state = await core.store.read_stages(name)
    except SecretNotFound:
        state = None
    pending = state.version_for(PENDING) if state is not None else None
    if rule is None and pending is None:
        return None
    out: dict[str, Any] = {"pending_version": pending, "rule": None}
    if rule is not None:
        schedule = schedule_of(rule)
        due = await check_due(core.store, name, schedule) if state is not None else None
        out["rule"] = {"rotator": rule.rotator, "schedule": schedule.describe()}
        out["next_scheduled"] = iso(due.next_check if due is not None else time.time())
        out["due_now"] = bool(due and due.run)
    out["agent"] = _agent_view(config, name)
    return out


def _agent_view(config: AgentConfig, name: str) -> dict[str, Any] | None:
    """Last result and failures in a row, as the running agent saw them (if it runs)."""
    try:
        doc = SecretsClient(config.listen.socket, timeout=2.0).get_json_document("/v1/status")
    except (ClientError, AgentError, OSError):
        return None
    for entry in doc.get("rotation", []) if isinstance(doc, dict) else []:
        if isinstance(entry, dict) and entry.get("secret") == name:
            return {
                k: entry.get(k)
                for k in (
                    "last_result",
                    "last_error",
                    "failed_step",
                    "failures_in_a_row",
                    "failing",
                    "last_success",
                    "next_at",
                )
            }
    return None


def print_rotation_state(doc: dict[str, Any]) -> None:
    print("  rotation:")
    rule = doc.get("rule")
    if rule:
        print(f"    rule: {rule['rotator']}, {rule['schedule']}")
        due = " (due now)" if doc.get("due_now") else ""
        print(f"    next scheduled: {doc.get('next_scheduled')}{due}")
    print(f"    pending version: {doc.get('pending_version') or '-'}")
    agent = doc.get("agent")
    if agent is None:
        print("    last result: unknown (no running agent answered on its socket)")
        return
    print(
        f"    last result: {agent.get('last_result') or '-'}"
        + (f" at step {agent['failed_step']}" if agent.get("failed_step") else "")
        + (f": {agent['last_error']}" if agent.get("last_error") else "")
    )
    flag = " (FAILING)" if agent.get("failing") else ""
    print(f"    failures in a row: {agent.get('failures_in_a_row', 0)}{flag}")
    print(f"    last success: {agent.get('last_success') or '-'}")
    print(f"    next check by the agent: {agent.get('next_at') or '-'}")


def register(sub: Any) -> None:
    p = sub.add_parser(
        "rotate", help="rotate a secret now (create, set, test, finish), or resume a rotation"
    )
    p.add_argument("name", help="the secret's name")
    p.add_argument(
        "--dry-run", action="store_true", help="show where it would start; change nothing"
    )
    p.add_argument(
        "--rotator",
        help=f"rotator to use ({', '.join(sorted(ROTATORS))}; default: the secret's rotation rule)",
    )
    p.add_argument(
        "--param",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="rotator parameter (repeatable); overrides the rule's",
    )
    p.set_defaults(func=cmd_rotate)
