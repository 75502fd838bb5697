"""Setup and operations: init, check-config, run, status, health, keys."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from agent.client import ClientError, SecretsClient
from agent.commands.common import (
    EXIT_FAILURE,
    EXIT_OK,
    config_path,
    err,
    event_loop_factory,
    load,
    run_async,
    with_core,
)
from agent.config import AgentConfig, default_config_path, parse_duration
from agent.core import Core
from agent.errors import ConfigError
from agent.keys.base import KeyInfo, KeyManager

INIT_CONFIG = """\
# secrets-agent configuration, written by `secrets-agent init`.
# Every field is optional; docs/configuration.md lists them all with defaults.
# Relative paths are resolved against this file's directory.

# Nothing is written next to this file: it may sit on a read-only mount.
listen:
  # The HTTP API's Unix socket. Default: /run/secrets-agent/agent.sock as root
  # and in the container image; else $XDG_RUNTIME_DIR/secrets-agent/agent.sock;
  # else ~/.cache/secrets-agent/agent.sock (the agent logs it at start).
  # socket: /run/secrets-agent/agent.sock
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
  # Hash-chained audit records on stdout: works on a read-only root with this
  # file on a read-only mount. For a file, give a path on a writable volume
  # (e.g. /var/lib/secrets-agent/audit.log).
  path: "-"

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

    loader = None
    if args.aws_agent_config:
        loader = _aws_agent_loader(args)
        config = loader(None)
    else:
        config = load(args)
    setup_logging(config.log)
    harden_process()

    async def main() -> None:
        daemon = Daemon(config)
        if loader is not None:
            daemon.loader = loader  # reloads lay the TOML over the YAML again
        await daemon.run()

    with asyncio.Runner(loop_factory=event_loop_factory()) as runner:
        runner.run(main())
    return EXIT_OK


def _aws_agent_loader(args: argparse.Namespace) -> Callable[[Path | None], AgentConfig]:
    """Load ``--aws-agent-config`` over the YAML config, if one is given or exists."""
    from agent.awsagent import load_with_aws_agent_config

    toml_path = Path(args.aws_agent_config)
    yaml_path: Path | None = config_path(args)
    explicit = bool(getattr(args, "config", None) or os.environ.get("SECRETS_AGENT_CONFIG"))
    if yaml_path is not None and not yaml_path.exists():
        if explicit:
            raise ConfigError(f"no config at {yaml_path}")
        yaml_path = None  # the AWS agent's own setup: AWS Secrets Manager, plain values
    reported: set[str] = set()

    def report(line: str) -> None:
        if line not in reported:  # once per run, not on every reload
            reported.add(line)
            err(f"warning: {line}")

    def loader(_source: Path | None) -> AgentConfig:
        return load_with_aws_agent_config(yaml_path, toml_path, report=report)

    return loader


def _client(args: argparse.Namespace) -> SecretsClient:
    if args.socket:
        return SecretsClient(args.socket)
    try:
        return SecretsClient(load(args).listen.socket)
    except ConfigError:
        return SecretsClient()


def cmd_status(args: argparse.Namespace) -> int:
    """Print a running agent's status: a table for people, ``--json`` for scripts."""
    try:
        doc = _client(args).get_json_document("/v1/status")
    except ClientError as exc:
        err(str(exc))
        return EXIT_FAILURE
    if args.json:
        print(json.dumps(doc, indent=2))
        return EXIT_OK
    print(format_status(doc))
    return EXIT_OK


def format_status(doc: dict[str, Any]) -> str:
    """The ``status`` tables: secrets, then templates; every column aligned."""
    lines = [f"ready: {'yes' if doc.get('ready') else 'no'}"]
    if "secrets" not in doc:
        # The agent shows details only to a caller some access rule names.
        uid = os.geteuid()
        lines += [
            "",
            f"details hidden: no access rule names this caller (uid {uid}). To let it see",
            "status without reading any value, add to access: "
            f'{{secrets: ["*"], uids: [{uid}], stages: []}}',
        ]
        return "\n".join(lines)
    secrets = doc.get("secrets") or []
    rows = [["SECRET", "VERSION", "STAGES", "CHECKED", "LAST REFRESH", "STATE"]]
    for s in secrets:
        state = "ok"
        if s.get("stale"):
            state = "STALE"
        if s.get("last_error"):
            state += f" ({s['last_error']})"
        rows.append(
            [
                str(s.get("name")),
                str(s.get("version_id") or "-"),
                _stages_of(s) or "-",
                _ago(s.get("age_seconds")),
                _time(s.get("last_refresh")),
                state,
            ]
        )
    lines += ["", *_table(rows)] if secrets else ["", "no secrets loaded"]
    templates = doc.get("templates") or []
    if templates:
        rows = [["TEMPLATE", "DESTINATION", "RENDERS", "LAST RENDER", "LAST NOTIFY", "STATE"]]
        for t in templates:
            rows.append(
                [
                    str(t.get("name", "-")),
                    str(t.get("destination")),
                    str(t.get("renders", 0)),
                    _time(t.get("last_render")),
                    _time(t.get("last_notify")),
                    f"ERROR ({t['error']})" if t.get("error") else "ok",
                ]
            )
        lines += ["", *_table(rows)]
    return "\n".join(lines)


def _stages_of(s: dict[str, Any]) -> str:
    """The stages carried by the secret's CURRENT version (``CURRENT,PREVIOUS``...)."""
    vid = s.get("version_id")
    stages = s.get("stages") or {}
    return ",".join(stage for stage, v in sorted(stages.items()) if v == vid)


def _ago(seconds: object) -> str:
    if not isinstance(seconds, (int, float)):
        return "-"
    if seconds < 120:
        return f"{seconds:.0f}s ago"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m ago"
    return f"{seconds / 3600:.1f}h ago"


def _time(iso: object) -> str:
    """``2026-12-01T23:15:14.123+00:00`` as ``2026-12-01 23:15:14``."""
    if not isinstance(iso, str) or not iso:
        return "-"
    return iso.replace("T", " ")[:19]


def _table(rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]


def cmd_health(args: argparse.Namespace) -> int:
    """One check, or checks every 0.5 s until one passes or ``--wait`` runs out."""
    path = "/readyz" if args.ready else "/healthz"
    try:
        wait = parse_duration(args.wait)
    except ValueError as exc:
        raise ConfigError(f"--wait: {exc}") from None
    deadline = time.monotonic() + wait
    client = _client(args)
    while True:
        try:
            status, _, body = client.request(path)
        except ClientError as exc:
            failure, status, body = str(exc), 0, b""
        if status == 200 or time.monotonic() >= deadline:
            break
        time.sleep(min(0.5, max(0.0, deadline - time.monotonic())))
    if status == 0:
        err(failure)
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

    audit = AuditLog.from_config(config.audit, base_dir=config.base_dir, stream_fd=2)
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
    p.add_argument(
        "--aws-agent-config",
        metavar="FILE",
        help="the AWS Secrets Manager Agent's TOML config, mapped onto ours (docs/aws.md)",
    )
    p.set_defaults(func=cmd_run)

    for name, func, text in (
        ("status", cmd_status, "show a running agent's status"),
        ("health", cmd_health, "exit 0 if a running agent is healthy"),
    ):
        p = sub.add_parser(name, help=text)
        p.add_argument("--socket", help="the agent's socket (default: from the config)")
        if name == "status":
            p.add_argument("--json", action="store_true", help="the status document, for scripts")
        else:
            p.add_argument("--ready", action="store_true", help="check readiness instead")
            p.add_argument(
                "--wait",
                default="0s",
                metavar="DURATION",
                help="keep checking for up to this long, e.g. 30s (default: check once)",
            )
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
        kp.add_argument("--json", action="store_true", help="JSON, for scripts")
    p.set_defaults(func=cmd_keys)
