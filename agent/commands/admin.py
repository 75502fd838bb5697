"""Setup and operations: init, check-config, run, status, health, keys."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
from pathlib import Path
from typing import Any

from agent.client import ClientError, SecretsClient
from agent.commands.common import (
    EXIT_FAILURE,
    EXIT_OK,
    config_path,
    err,
    load,
    run_async,
    with_core,
)
from agent.config import AgentConfig, default_config_path
from agent.core import Core
from agent.errors import ConfigError
from agent.keys.base import KeyInfo, KeyManager

INIT_CONFIG = """\
# secrets-agent configuration, written by `secrets-agent init`.
# Every field is optional; docs/configuration.md lists them all with defaults.
# Relative paths are resolved against this file's directory.

listen:
  socket: ./agent.sock          # the HTTP API on a Unix socket
  socket_mode: "0660"

metrics:
  listen: null                  # "127.0.0.1:9464" to serve /metrics on TCP too

keys:
  local: {type: local, keyring: ./keyring.json}   # master keys, mode 0600
write_keys: [local]

store:
  type: file
  path: ./store                 # envelopes only: never plaintext

secrets: ["*"]                  # names or globs to preload and keep fresh

audit:
  path: ./audit.log

log:
  level: info
"""


def cmd_init(args: argparse.Namespace) -> int:
    """Create a config, a keyring (0600) and an empty store in one directory."""
    from agent.keys.local import LocalKeyring

    directory = Path(args.dir) if args.dir else default_config_path().parent
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    cfg = directory / "agent.yaml"
    if cfg.exists():
        print(f"{cfg} exists; leaving it as it is")
    else:
        cfg.write_text(INIT_CONFIG, encoding="utf-8")
        os.chmod(cfg, 0o600)
        print(f"wrote {cfg}")
    keyring = directory / "keyring.json"
    if keyring.exists():
        print(f"{keyring} exists; leaving it as it is")
    else:
        LocalKeyring.create(keyring)
        print(f"wrote {keyring} (mode 0600)")
    (directory / "store").mkdir(mode=0o700, exist_ok=True)
    print(f"next: echo -n value | secrets-agent -c {cfg} put NAME; secrets-agent -c {cfg} run")
    return EXIT_OK


def cmd_check_config(args: argparse.Namespace) -> int:
    config = load(args)
    print(
        f"{config_path(args)}: ok ({len(config.templates)} templates, "
        f"store {config.store.type}, key providers {', '.join(config.keys)})"
    )
    return EXIT_OK


def cmd_run(args: argparse.Namespace) -> int:
    from agent.daemon import Daemon
    from agent.hardening import harden_process
    from agent.logsetup import setup_logging

    config = load(args)
    setup_logging(config.log)
    harden_process()

    async def main() -> None:
        await Daemon(config).run()

    asyncio.run(main())
    return EXIT_OK


def _client(args: argparse.Namespace) -> SecretsClient:
    if args.socket:
        return SecretsClient(args.socket)
    try:
        return SecretsClient(load(args).listen.socket)
    except ConfigError:
        return SecretsClient()


def cmd_status(args: argparse.Namespace) -> int:
    try:
        doc = _client(args).get_json_document("/v1/status")
    except ClientError as exc:
        err(str(exc))
        return EXIT_FAILURE
    if args.json:
        print(json.dumps(doc, indent=2))
        return EXIT_OK
    print(f"ready: {doc.get('ready')}")
    for s in doc.get("secrets", []):
        flag = " STALE" if s.get("stale") else ""
        error = f"  error: {s['last_error']}" if s.get("last_error") else ""
        print(f"  {s['name']}  {s.get('version_id')}  age {s.get('age_seconds')}s{flag}{error}")
    for t in doc.get("templates", []):
        print(f"  template {t.get('destination')}: {t.get('last_render')} {t.get('error') or ''}")
    return EXIT_OK


def cmd_health(args: argparse.Namespace) -> int:
    path = "/readyz" if args.ready else "/healthz"
    try:
        status, _, body = _client(args).request(path)
    except ClientError as exc:
        err(str(exc))
        return EXIT_FAILURE
    print(body.decode(errors="replace"))
    return EXIT_OK if status == 200 else EXIT_FAILURE


def _managers(core: Core, provider: str | None) -> dict[str, KeyManager]:
    names = [provider] if provider else list(core.providers)
    out: dict[str, KeyManager] = {}
    for name in names:
        if name not in core.providers:
            raise ConfigError(f"no key provider {name!r} under 'keys'")
        p = core.providers[name]
        if isinstance(p, KeyManager):
            out[name] = p
        elif provider:
            raise ConfigError(f"key provider {name!r} does not support key management")
    return out


def cmd_keys(args: argparse.Namespace) -> int:
    config = load(args)

    async def go(core: Core) -> list[KeyInfo]:
        infos: list[KeyInfo] = []
        for manager in _managers(core, args.provider).values():
            if args.keys_command == "list":
                infos.extend(await manager.list_keys())
            elif args.keys_command == "create":
                infos.append(await manager.create_key())
            else:
                infos.append(await manager.rotate_key())
        return infos

    infos = run_async(with_core(config, go))
    if args.keys_command in ("create", "rotate"):
        _audit_key_change(config, args.keys_command, infos)
    if getattr(args, "json", False):
        print(
            json.dumps(
                [info.__dict__ if hasattr(info, "__dict__") else _info(info) for info in infos],
                indent=2,
            )
        )
    else:
        for i in infos:
            primary = " primary" if i.primary else ""
            print(f"{i.provider}\t{i.key}\tv{i.version}\t{i.state}{primary}\t{i.detail}")
    return EXIT_OK


def _audit_key_change(config: AgentConfig, command: str, infos: list[KeyInfo]) -> None:
    from agent.audit import AuditLog

    audit = AuditLog.from_config(config.audit, base_dir=config.base_dir)
    event = "key_created" if command == "create" else "key_rotated"
    for info in infos:
        audit.record(event, outcome="ok", reason=f"{info.provider}/{info.key} v{info.version}")
    run_async(audit.aclose())


def _info(info: KeyInfo) -> dict[str, Any]:
    return {f: getattr(info, f) for f in info.__slots__}


def register(sub: Any) -> None:
    p = sub.add_parser("init", help="create a config, keyring and store in a directory")
    p.add_argument("--dir", help="directory (default: the default config's directory)")
    p.set_defaults(func=cmd_init)

    p = sub.add_parser("check-config", help="validate the config and exit")
    p.set_defaults(func=cmd_check_config)

    p = sub.add_parser("run", help="run the agent")
    p.set_defaults(func=cmd_run)

    for name, func, text in (
        ("status", cmd_status, "show a running agent's status"),
        ("health", cmd_health, "exit 0 if a running agent is healthy"),
    ):
        p = sub.add_parser(name, help=text)
        p.add_argument("--socket", help="the agent's socket (default: from the config)")
        if name == "status":
            p.add_argument("--json", action="store_true")
        else:
            p.add_argument("--ready", action="store_true", help="check readiness instead")
        p.set_defaults(func=func)

    p = sub.add_parser("keys", help="list, create or rotate master keys")
    ksub = p.add_subparsers(dest="keys_command", required=True)
    for name, text in (
        ("list", "list master keys and their state"),
        ("create", "create the master key"),
        ("rotate", "make a new master-key version primary"),
    ):
        kp = ksub.add_parser(name, help=text)
        kp.add_argument("--provider", help="only this provider (a name under 'keys')")
        kp.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_keys)
