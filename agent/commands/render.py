"""``render --once`` and ``exec``."""

from __future__ import annotations

import argparse
import asyncio
import base64
import signal
from collections.abc import Sequence
from typing import Any

from agent.client import ClientError, SecretsClient
from agent.commands.common import EXIT_FAILURE, EXIT_OK, EXIT_USAGE, err, load, with_core
from agent.config import AgentConfig, parse_duration
from agent.core import Core
from agent.errors import AgentError, BadRequest
from agent.metrics import Metrics
from agent.render.exec import ExecRunner, Reference, field_text, parse_reference
from agent.render.renderer import Renderer
from agent.render.sources import StoreSource
from agent.types import CURRENT, normalize_stage


def cmd_render(args: argparse.Namespace) -> int:
    config = load(args)
    if not args.once:
        err("render runs inside the agent (`secrets-agent run`); use --once to render and exit")
        return EXIT_USAGE

    async def go(core: Core) -> list[str]:
        renderer = Renderer(
            config.templates, StoreSource(core), render_config=config.render, metrics=Metrics()
        )
        await renderer.probe()
        return await renderer.render_all()

    failures = asyncio.run(with_core(config, go))
    for message in failures:
        err(f"render failed: {message}")
    if failures:
        return EXIT_FAILURE
    print(f"rendered {len(config.templates)} templates")
    return EXIT_OK


def _socket_client(args: argparse.Namespace, config: AgentConfig | None) -> SecretsClient | None:
    """A client on the running agent's socket, if one answers."""
    path = args.socket or (config.listen.socket if config is not None else None)
    if path is None:
        return None
    client = SecretsClient(path)
    try:
        status, _, _ = client.request("/healthz")
    except ClientError:
        if args.socket:
            raise
        return None
    return client if status == 200 else None


class _SocketResolver:
    """Values and cheap version checks through a running agent's socket."""

    def __init__(self, client: SecretsClient) -> None:
        self.client = client

    async def resolve(self, ref: Reference) -> tuple[str, str]:
        doc = await asyncio.to_thread(self.client.describe, ref.name, stage=ref.stage)
        if "value_base64" in doc:
            value = base64.b64decode(doc["value_base64"])
        else:
            value = str(doc.get("value", "")).encode()
        return field_text(value, ref), str(doc["version_id"])

    async def versions(self, refs: Sequence[Reference]) -> dict[str, str]:
        """One ``GET /v1/secrets`` (no values) for all references; describe the unlisted."""
        listed = await asyncio.to_thread(self.client.list_secrets)
        stages = {item["name"]: item.get("stages") or {} for item in listed}
        out = {}
        for ref in refs:
            version = stages.get(ref.name, {}).get(ref.stage or CURRENT)
            out[ref.var] = str(version) if version else (await self.resolve(ref))[1]
        return out


class _StoreResolver:
    """Values from the store; version checks read only the stage maps."""

    def __init__(self, core: Core) -> None:
        self.core = core
        self.source = StoreSource(core)

    async def resolve(self, ref: Reference) -> tuple[str, str]:
        secret = await self.source.get(ref.name, stage=ref.stage)
        return field_text(secret.value.reveal(), ref), secret.version_id

    async def versions(self, refs: Sequence[Reference]) -> dict[str, str]:
        out = {}
        for ref in refs:
            state = await self.core.store.read_stages(ref.name)
            out[ref.var] = str(state.stages.get(normalize_stage(ref.stage or CURRENT)))
        return out


async def _exec(args: argparse.Namespace, refs: list[Reference], config: AgentConfig | None) -> int:
    client = _socket_client(args, config)
    core = Core.build(config) if client is None and config is not None else None
    resolver: _SocketResolver | _StoreResolver
    if client is not None:
        resolver = _SocketResolver(client)
    elif core is not None:
        resolver = _StoreResolver(core)
    else:
        raise BadRequest("no agent socket answers and no config to read the store with")
    runner = ExecRunner(
        args.command,
        refs,
        resolver.resolve,
        versions=resolver.versions,
        restart_on_change=args.restart_on_change,
        stop_signal=signal.Signals[args.stop_signal],
        stop_timeout=parse_duration(args.stop_timeout),
        poll=parse_duration(args.poll),
    )
    try:
        return await runner.run()
    finally:
        if core is not None:
            await core.aclose()


def cmd_exec(args: argparse.Namespace) -> int:
    command = list(args.command)
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        err("exec: give the command after --")
        return EXIT_USAGE
    args.command = command
    refs = [parse_reference(spec) for spec in args.env or []]
    config = None
    try:
        config = load(args)
    except AgentError:
        if not args.socket:
            raise
    try:
        return asyncio.run(_exec(args, refs, config))
    except FileNotFoundError:
        err(f"exec: command not found: {command[0]}")
        return 127
    except KeyboardInterrupt:
        return 130


def register(sub: Any) -> None:
    p = sub.add_parser("render", help="render every template once and exit (init containers)")
    p.add_argument("--once", action="store_true", help="render and exit 0, or 1 on failure")
    p.set_defaults(func=cmd_render)

    p = sub.add_parser("exec", help="run a command with secrets in its environment")
    p.add_argument(
        "--env",
        action="append",
        metavar="VAR=secret://NAME[#KEY]",
        help="an environment variable from a secret (repeatable)",
    )
    p.add_argument("--socket", help="read through this agent socket")
    p.add_argument(
        "--restart-on-change",
        action="store_true",
        help="restart the command when a referenced secret changes",
    )
    p.add_argument(
        "--stop-signal",
        default="SIGTERM",
        choices=[s.name for s in signal.Signals],
        metavar="SIGNAL",
        help="sent to stop the command for a restart (default SIGTERM)",
    )
    p.add_argument(
        "--stop-timeout", default="10s", metavar="DURATION", help="before SIGKILL (default 10s)"
    )
    p.add_argument(
        "--poll", default="1s", metavar="DURATION", help="version check interval (default 1s)"
    )
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- CMD [ARGS...]")
    p.set_defaults(func=cmd_exec)
