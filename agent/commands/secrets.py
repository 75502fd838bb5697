"""Writer and reader subcommands: put, import, get, list, describe, promote."""

from __future__ import annotations

import argparse
import io
import json
import sys
from pathlib import Path
from typing import Any

import yaml

from agent.commands.common import EXIT_OK, Progress, err, load, run_async, with_core
from agent.core import Core
from agent.deletion import deletion_of, iso, not_found
from agent.errors import BadRequest, SecretNotFound
from agent.types import (
    CURRENT,
    SecretValue,
    ValueType,
    normalize_stage,
    stages_of,
    validate_name,
)

#: Secrets written per batch: their versions, then their stage maps, each made
#: durable with one sync (two fsyncs per file before: 4 ms a secret).
_IMPORT_BATCH = 500


def _read_value(args: argparse.Namespace) -> bytes:
    if args.value is not None:
        err(
            "warning: --value shows the secret in the process list and shell history; "
            "prefer stdin or --file"
        )
        return str(args.value).encode()
    if args.file is not None:
        return Path(args.file).read_bytes()
    if sys.stdin.isatty():
        err("reading the value from the terminal; end with Ctrl-D")
    data = sys.stdin.buffer.read()
    # A value piped with `echo` carries one trailing newline that is not part of it.
    return data[:-1] if data.endswith(b"\n") and not data.endswith(b"\n\n") else data


def cmd_put(args: argparse.Namespace) -> int:
    config = load(args)
    validate_name(args.name)
    value = _read_value(args)
    value_type: ValueType = "binary" if args.binary else "string"
    if value_type == "string":
        try:
            value.decode("utf-8")
        except UnicodeDecodeError:
            raise BadRequest("the value is not UTF-8 text; use --binary") from None

    async def go(core: Core) -> Any:
        return await core.writer().put(
            args.name, value, value_type=value_type, stage=args.stage, validate_json=args.json
        )

    result = run_async(with_core(config, go))
    print(f"{result.name}: version {result.version_id} {' '.join(result.stages)}")
    return EXIT_OK


def _parse_dotenv(path: Path, text: str) -> dict[str, str]:
    """A dotenv file read as python-dotenv reads it (quotes, escapes, ``${VAR}``, comments).

    Its own parser is used: a hand-rolled one kept inline comments and did not
    unescape, so importing the agent's own dotenv output changed the values.
    A statement it cannot parse, or a name without ``=``, is an error naming
    the line (python-dotenv would only log a warning and skip it).
    """
    from dotenv import dotenv_values
    from dotenv.parser import parse_stream

    for binding in parse_stream(io.StringIO(text)):
        line = binding.original.line
        if binding.error:
            raise BadRequest(f"{path}:{line}: not a dotenv statement; expected NAME=VALUE")
        if binding.key is not None and binding.value is None:
            raise BadRequest(f"{path}:{line}: {binding.key} has no '='; expected NAME=VALUE")
    values = dotenv_values(stream=io.StringIO(text))
    return {key: value for key, value in values.items() if value is not None}


def parse_import_file(path: Path, fmt: str | None) -> dict[str, bytes]:
    """Secrets from a JSON/YAML mapping or a dotenv file, as name -> bytes."""
    text = path.read_text(encoding="utf-8")
    fmt = fmt or {".json": "json", ".yaml": "yaml", ".yml": "yaml", ".env": "dotenv"}.get(
        path.suffix.lower(), "dotenv" if path.name.startswith(".env") else "yaml"
    )
    doc: Any
    if fmt == "dotenv":
        doc = _parse_dotenv(path, text)
    else:
        try:
            doc = json.loads(text) if fmt == "json" else yaml.safe_load(text)
        except (ValueError, yaml.YAMLError) as exc:
            raise BadRequest(f"{path}: not valid {fmt}: {type(exc).__name__}") from None
    if not isinstance(doc, dict):
        raise BadRequest(f"{path}: expected a mapping of secret names to values")
    out = {}
    for name, value in doc.items():
        validate_name(str(name))
        out[str(name)] = (value if isinstance(value, str) else json.dumps(value)).encode()
    return out


async def unchanged(core: Core, name: str, value: bytes) -> bool:
    """Whether ``name``'s CURRENT value is already ``value`` (a text value; constant time).

    Writing it again would make a new version of the same value and push the
    real previous value out of PREVIOUS.
    """
    try:
        state = await core.store.read_stages(name)
    except SecretNotFound:
        return False
    version = state.stages.get(CURRENT)
    if version is None:
        return False
    current = await core.resolver.fetch(name, version)
    same: bool = current.value == SecretValue(value)
    return same and current.value_type == "string"


def cmd_import(args: argparse.Namespace) -> int:
    config = load(args)
    secrets = parse_import_file(Path(args.path), args.format)
    prefix = args.prefix or ""
    progress = Progress(len(secrets), "import")
    kept: list[str] = []

    async def go(core: Core) -> None:
        writer = core.writer()
        todo = [(prefix + name, value) for name, value in secrets.items()]
        for start in range(0, len(todo), _IMPORT_BATCH):
            batch = todo[start : start + _IMPORT_BATCH]
            states = await writer.states_of([name for name, _ in batch])
            fresh = []
            for (name, value), state in zip(batch, states, strict=True):
                # Only a secret that has a CURRENT can already hold this value.
                if CURRENT in state.stages and await unchanged(core, name, value):
                    kept.append(name)
                    progress.step()
                else:
                    fresh.append((name, value))
            for result in await writer.put_many(fresh):
                if isinstance(result, Exception):
                    raise result
                progress.step()

    try:
        run_async(with_core(config, go))
    finally:
        progress.close()
    written = progress.done - len(kept)
    print(f"import: {written} written, {len(kept)} unchanged (no new version)", file=sys.stderr)
    return EXIT_OK


def cmd_get(args: argparse.Namespace) -> int:
    config = load(args)
    validate_name(args.name)

    async def go(core: Core) -> bytes:
        stage = normalize_stage(args.stage or CURRENT)
        version = args.version
        if version is None:
            state = await core.store.read_stages(args.name)
            gone = deletion_of(state.stages)
            if gone is not None:
                raise not_found(args.name, gone)
            version = state.stages.get(stage)
            if version is None:
                raise SecretNotFound(f"secret {args.name!r} has no version at stage {stage!r}")
        secret = await core.resolver.fetch(args.name, version)
        if args.key is not None:
            field = secret.value.json_key(args.key)
            return (field if isinstance(field, str) else json.dumps(field)).encode()
        return secret.value.reveal()

    value = run_async(with_core(config, go))
    sys.stdout.buffer.write(value)
    if sys.stdout.isatty() and not value.endswith(b"\n"):
        sys.stdout.buffer.write(b"\n")
    sys.stdout.flush()
    return EXIT_OK


def cmd_list(args: argparse.Namespace) -> int:
    config = load(args)

    async def go(core: Core) -> list[dict[str, Any]]:
        out = []
        for name in await core.store.list_names():
            state = await core.store.read_stages(name)
            gone = deletion_of(state.stages)
            if gone is not None and gone.purged:
                continue  # deleted for good: only a tombstone is left
            row: dict[str, Any] = {"name": name, "stages": dict(state.stages)}
            if gone is not None:
                row["deleted_until"] = iso(gone.until) if gone.until is not None else None
            out.append(row)
        return out

    rows = run_async(with_core(config, go))
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        for row in rows:
            note = ""
            if "deleted_until" in row:
                note = f"\tscheduled for deletion until {row['deleted_until']}"
            print(f"{row['name']}\t{row['stages'].get(CURRENT, '-')}{note}")
    return EXIT_OK


def cmd_describe(args: argparse.Namespace) -> int:
    config = load(args)
    validate_name(args.name)

    async def go(core: Core) -> dict[str, Any]:
        from agent.commands.rotate import rotation_state

        state = await core.store.read_stages(args.name)
        versions = await core.store.list_versions(args.name)
        gone = deletion_of(state.stages)
        return {
            "name": args.name,
            "store": core.store.store_id,
            "deletion": None
            if gone is None
            else {
                "purged": gone.purged,
                "recoverable_until": iso(gone.until) if gone.until is not None else None,
            },
            "stages": dict(state.stages),
            "versions": [
                {
                    "version_id": v,
                    "created_at": t.isoformat(),
                    "stages": list(stages_of(state.stages, v)),
                }
                for v, t in versions
            ],
            "rotation": await rotation_state(core, config, args.name),
        }

    doc = run_async(with_core(config, go))
    if args.json:
        print(json.dumps(doc, indent=2))
    else:
        print(f"{doc['name']} (store {doc['store']})")
        gone = doc["deletion"]
        if gone is not None:
            print(
                "  deleted for good (purged)"
                if gone["purged"]
                else f"  scheduled for deletion: restore it until {gone['recoverable_until']}"
            )
        for v in doc["versions"]:
            print(f"  {v['version_id']}  {v['created_at']}  {' '.join(v['stages'])}")
        if doc["rotation"] is not None:
            from agent.commands.rotate import print_rotation_state

            print_rotation_state(doc["rotation"])
    return EXIT_OK


def cmd_promote(args: argparse.Namespace) -> int:
    config = load(args)

    async def go(core: Core) -> Any:
        return await core.writer().promote(args.name, args.stage, args.version)

    state = run_async(with_core(config, go))
    print(f"{args.name}: " + " ".join(f"{s}={v}" for s, v in sorted(state.stages.items())))
    return EXIT_OK


def register(sub: Any) -> None:
    """Add this module's subcommands to the parser."""
    p = sub.add_parser("put", help="write a new version (value from stdin by default)")
    p.add_argument("name", help="the secret's name, e.g. app/db-password")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--file", help="read the value from this file")
    src.add_argument("--value", help="the value itself (visible in the process list)")
    p.add_argument("--json", action="store_true", help="check that the value is JSON")
    p.add_argument("--binary", action="store_true", help="store the bytes as a binary value")
    p.add_argument("--stage", default=CURRENT, help="stage to move to it (default CURRENT)")
    p.set_defaults(func=cmd_put)

    p = sub.add_parser("import", help="write many secrets from a JSON, YAML or dotenv file")
    p.add_argument("path", help="a file of name: value pairs (a JSON object, YAML mapping or .env)")
    p.add_argument(
        "--format",
        choices=["json", "yaml", "dotenv"],
        help="the file's format (default: from its extension)",
    )
    p.add_argument("--prefix", help="prepended to every name, e.g. app/")
    p.set_defaults(func=cmd_import)

    p = sub.add_parser("get", help="decrypt and print one secret (reads the store directly)")
    p.add_argument("name", help="the secret's name")
    sel = p.add_mutually_exclusive_group()
    sel.add_argument("--stage", help="the version carrying this stage (default CURRENT)")
    sel.add_argument("--version", help="this version id")
    p.add_argument("--key", help="print one field of a JSON secret")
    p.set_defaults(func=cmd_get)

    p = sub.add_parser("list", help="list secret names and their CURRENT versions")
    p.add_argument("--json", action="store_true", help="JSON, for scripts")
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("describe", help="versions and stages of a secret (never values)")
    p.add_argument("name", help="the secret's name")
    p.add_argument("--json", action="store_true", help="JSON, for scripts")
    p.set_defaults(func=cmd_describe)

    p = sub.add_parser("promote", help="move a stage to a version")
    p.add_argument("name", help="the secret's name")
    p.add_argument("stage", help="CURRENT, PREVIOUS, PENDING or a custom label (not DELETED.*)")
    p.add_argument("version", help="the version id to move it to (see describe)")
    p.set_defaults(func=cmd_promote)
