"""Generate the field reference in docs/configuration.md from the config model.

Fields, types and defaults come from :class:`agent.config.AgentConfig` itself;
the meaning of each field comes from its ``Field(description=...)`` if it has
one, else from :data:`DESCRIPTIONS` below. Every field must have a meaning, and
every entry of :data:`DESCRIPTIONS` must name a field, so the reference cannot
drift from the model. Regenerate after changing the config model::

    python -m agent.config_docs --write     # rewrites docs/configuration.md
    python -m agent.config_docs --check     # exit 1 if the committed file is stale
"""

from __future__ import annotations

import argparse
import enum
import sys
import types
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from agent import config as c

REGENERATE = "python -m agent.config_docs --write"
BEGIN = "<!-- BEGIN GENERATED: config reference -->"
END = "<!-- END GENERATED: config reference -->"
DOC = Path(__file__).resolve().parent.parent / "docs" / "configuration.md"

#: Defaults that depend on the machine (uid, environment), written as rules.
DEFAULTS = {
    "listen.socket": "as root `/run/secrets-agent/agent.sock`; else "
    "`$XDG_RUNTIME_DIR/secrets-agent/agent.sock`; else `~/.cache/secrets-agent/agent.sock` "
    "(never a predictable path under `/tmp`)",
    "access": "`[{secrets: ['*'], uids: [<the agent's uid>]}]`",
    "keys": "`{local: {type: local}}`",
    "store": "`{type: file}`",
}

#: The meaning of each field (``<name>`` stands for a key of a mapping,
#: ``[]`` for an item of a list). A field's own ``description`` wins.
DESCRIPTIONS = {
    "listen": "The API's listeners.",
    "listen.socket": "The HTTP API's Unix socket. Its directory is created `0711`; it and "
    "every directory above it must be owned by the agent's uid or root and writable by no one "
    "else (sticky parents such as `/tmp` excepted); a refusal names the path, owner, mode and "
    "fix. A stale socket is removed; another live agent on the path is an error. At most "
    "107 bytes.",
    "listen.shared_volume": "The socket directory's parent is a volume shared within one "
    "trust boundary (a pod's `emptyDir`, mode 0777): the agent creates the socket directory "
    "there (`0711`) and verifies it owns it (see security.md, Directories).",
    "listen.socket_mode": "Mode set right after bind (the socket is created `0600` first).",
    "listen.socket_group": "Group (name or gid) given the socket.",
    "listen.max_connections": "Requests in flight on the socket; beyond it, 429.",
    "listen.tcp": "Optional loopback TCP listener, compatible with the AWS Secrets Manager Agent.",
    "listen.tcp.address": "Loopback only (`127.0.0.1`, `[::1]`, `localhost`); anything else "
    "is refused.",
    "listen.tcp.tokens": "Token name to reference (`file:///...` or `env:VAR`); every TCP "
    "request but `/healthz` and `/ping` needs one.",
    "listen.tcp.max_connections": "Requests in flight on TCP; beyond it, 429.",
    "listen.tcp.aws_path_prefix": "Prefix of the AWS-agent path style `GET /v1/<name>`.",
    "listen.tcp.token_headers": "Request headers that may carry the token (the AWS agent's "
    "`ssrf_headers`; its defaults are the last two).",
    "metrics": "The Prometheus endpoint.",
    "metrics.listen": "TCP address serving `/metrics` only; `null` to serve metrics on the "
    "socket alone.",
    "keys": "Named key providers (master keys). See [keys.md](keys.md). `{}` (none) only "
    "with a plaintext store (`aws-secretsmanager`, `client_side_encryption: false`).",
    "keys.<name>.type": "`local`, `pkcs11` or `aws-kms`.",
    "keys.<name>.keyring": "The keyring file; must be mode 0600.",
    "keys.<name>.passphrase": "Seals the keyring with scrypt + AES-GCM.",
    "keys.<name>.module": "The PKCS#11 module (`.so`).",
    "keys.<name>.token": "Token label.",
    "keys.<name>.pin": "User PIN.",
    "keys.<name>.key": "Label of the AES master key on the token.",
    "keys.<name>.mechanism": "How data keys are wrapped.",
    "keys.<name>.key_id": "KMS key id, ARN or alias.",
    "keys.<name>.region": "AWS region (default: the SDK's).",
    "keys.<name>.endpoint_url": "Another endpoint (a VPC endpoint, a test server).",
    "keys.<name>.timeout": "Per-call timeout.",
    "keys.<name>.rotate_every": "Rotate this provider's master key on a schedule "
    "([keys.md](keys.md#scheduled-rotation)). `local`, `pkcs11`: any duration of `1s` or "
    "more; `aws-kms`: whole days from `90d` to `2560d` (KMS automatic rotation).",
    "write_keys": "Providers that wrap the data key of each new envelope (one recipient "
    "each). Each must be defined under `keys`.",
    "datakeys": "The data-key caches.",
    "datakeys.cache_capacity": "Unwrapped data keys held in memory (LRU).",
    "datakeys.max_age": "A cached data key is wiped after this ...",
    "datakeys.max_uses": "... or after this many uses.",
    "datakeys.max_messages": "A writer reuses one data key for this many envelopes (or `max_age`).",
    "store": "Where envelopes live. See [stores.md](stores.md).",
    "store.type": "`file`, `etcd`, `aws-secretsmanager` or `s3`.",
    "store.accept_unproven_stages": "Serve stage maps without proof (written before proofs "
    "existed). For the upgrade only: see envelope-format.md, Stage maps and their proof.",
    "store.id": "Logical store id, bound into every envelope's context and wrap context; "
    "keep it when migrating a store.",
    "store.path": "Directory of the file store.",
    "store.endpoints": "etcd client endpoints.",
    "store.prefix": "Key prefix.",
    "store.username": "etcd user.",
    "store.password": "etcd password.",
    "store.tls": "TLS to etcd.",
    "store.tls.ca": "CA bundle that signed the server's certificate.",
    "store.tls.cert": "Client certificate.",
    "store.tls.key": "Client key.",
    "store.timeout": "Per-call timeout.",
    "store.max_object_size": "An envelope or stage map larger than this is refused before it "
    "is read whole (file: fstat; S3: Content-Length; etcd, Secrets Manager: the value size). "
    "A refused envelope leaves the last good version in service; a refused stage map is "
    "served stale. See docs/reliability.md.",
    "store.max_json_depth": "JSON in store objects nested deeper than this is refused "
    "(a genuine envelope nests 3 levels).",
    "store.region": "AWS region (default: the SDK's).",
    "store.endpoint_url": "Another endpoint (a VPC endpoint, a test server).",
    "store.client_side_encryption": "`false`: serve plain AWS secrets as AWS stores them "
    "(read only).",
    "store.name_prefix": "Prefix of AWS secret names.",
    "store.bucket": "Bucket name.",
    "secrets": "Names or globs preloaded at start and kept fresh. Others load on first read.",
    "refresh": "How secrets are kept fresh. See [refresh.md](refresh.md).",
    "refresh.interval": "Poll interval, jittered.",
    "refresh.watch_interval": "Safety-net poll while a watch is healthy.",
    "refresh.jitter": "Fraction of jitter on intervals and backoff (0-1).",
    "refresh.watch": "Use the store's push (file: inotify via watchfiles; etcd: watch).",
    "refresh.max_stale": "How long the last good value is served while the store is "
    "failing; then 503.",
    "refresh.backoff_initial": "First retry after a transient error; doubles each time ...",
    "refresh.backoff_max": "... up to this.",
    "refresh.request_min_interval": "`refresh=true` checks the store at most once per "
    "secret per this.",
    "refresh.delete_grace": "A secret deleted from the store is dropped after this.",
    "access": "Who may read what; deny by default. See [security.md](security.md).",
    "access[].secrets": "Globs over secret names.",
    "access[].uids": "Caller uids (from the socket's peer credentials).",
    "access[].gids": "Caller gids, primary or supplementary.",
    "access[].exe": "Globs over the caller's `/proc/<pid>/exe`.",
    "access[].token": "A `listen.tcp.tokens` name (TCP callers).",
    "access[].stages": 'Stages this rule may read; `"*"` for all.',
    "templates": "Rendered files. See [rendering.md](rendering.md).",
    "templates[].name": "A short name: the `template` label of the render metrics and the "
    "name in `status` (default: the index in this list).",
    "templates[].destination": "The file (or directory, format `files`) written.",
    "templates[].secret": "The one secret rendered: a name, or `{name, stage, version}`.",
    "templates[].secrets": "The secrets a `template` reads.",
    "templates[].secret.name": "Secret name.",
    "templates[].secret.stage": "Stage to render (default `CURRENT`).",
    "templates[].secret.version": "A fixed version id instead of a stage.",
    "templates[].secrets[].name": "Secret name.",
    "templates[].secrets[].stage": "Stage to render (default `CURRENT`).",
    "templates[].secrets[].version": "A fixed version id instead of a stage.",
    "templates[].key": "One JSON field of the secret instead of the whole value.",
    "templates[].format": "Output format.",
    "templates[].template": "Inline Jinja2 template (sandboxed).",
    "templates[].template_file": "Jinja2 template file (sandboxed).",
    "templates[].mode": "File mode.",
    "templates[].owner": "Owner (name or uid; needs root).",
    "templates[].group": "Group (name or gid).",
    "templates[].allow_disk": "Allow a destination that is not on tmpfs/ramfs.",
    "templates[].on_change": "How the app learns of a new file.",
    "templates[].on_change.signal": "Signal sent (`SIGHUP`, `HUP`...).",
    "templates[].on_change.pid": "Process to signal.",
    "templates[].on_change.pid_file": "File holding the pid to signal.",
    "templates[].on_change.command": "Command run (argv list, no shell).",
    "templates[].on_change.timeout": "The command is killed after this.",
    "templates[].wait": "Debounce before notifying.",
    "templates[].wait.min": "Quiet time after the last change ...",
    "templates[].wait.max": "... but never more than this after the first.",
    "render": "Rendering-wide settings.",
    "render.allowed_dirs": "If non-empty, every destination must be under one of these.",
    "render.shared_volumes": "Volumes shared within one trust boundary (a pod's `emptyDir`): "
    "a destination's directory directly inside one is created `0711` and verified by the "
    "agent; nothing is written in the volume itself.",
    "render.cleanup_on_exit": "Remove rendered files on graceful shutdown.",
    "rotation": "Scheduled rotations.",
    "rotation[].secret": "The secret rotated.",
    "rotation[].every": "Interval between rotations (at least `1s`; slots aligned to the "
    "epoch). Give `every` or `cron`.",
    "rotation[].cron": "A cron expression (UTC; 5 fields, or 6 with seconds last).",
    "rotation[].window": "A rotation may start this long after its slot begins, no later.",
    "rotation[].flag_after_failures": "Failed attempts in a row after which `/v1/status` "
    "flags the secret.",
    "rotation[].rotator": "A registered rotator (`random`, `postgres`, `command`).",
    "rotation[].params": "The rotator's parameters.",
    "retention": "How many old versions the store keeps.",
    "retention.keep_unstaged": "Unstaged versions kept per secret, newest first (staged ones "
    "are always kept); `null` for no limit. Every `put`, `import` and rotation prunes the "
    "secret it wrote; `secrets-agent prune` prunes on demand.",
    "retention.max_age": "Also prune unstaged versions older than this (e.g. `90d`).",
    "audit": "The audit log. See [security.md](security.md).",
    "audit.path": "Hash-chained JSON-lines audit log: a file (relative: to the config's "
    "directory), `-` for stdout, `null` for none. `init` writes `-`, which works on a "
    "read-only root with a read-only config mount.",
    "log": "Logging (stderr).",
    "log.level": "Minimum level.",
    "log.format": "`text`, or `json` (one object per line).",
}


# --------------------------------------------------------------------------- walking the model


def _validators(annotation: Any) -> set[Any]:
    funcs = set()
    for meta in getattr(annotation, "__metadata__", ()):
        funcs.add(getattr(meta, "func", None))
    return funcs


def _type_name(annotation: Any, metadata: list[Any] | None = None) -> str:
    """A reader's name for a type: ``duration``, ``list of path``, ``"a" | "b"``..."""
    funcs = {getattr(m, "func", None) for m in metadata or []} | _validators(annotation)
    if c.parse_duration in funcs:
        return "duration"
    if c._parse_mode in funcs:
        return 'mode ("0400")'
    if c._resolve_path in funcs:
        return "path"
    if c._check_secret_ref in funcs:
        return "reference"
    if c.parse_size in funcs:
        return 'size (bytes, "64KiB", "1MiB")'
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is Annotated:
        meta = list(annotation.__metadata__)
        meta += [m for f in meta if isinstance(f, FieldInfo) for m in f.metadata]
        return _type_name(args[0], meta)
    if origin is Literal:
        return " \\| ".join(f"`{a}`" for a in args)
    if origin in (Union, types.UnionType):
        names = [_type_name(a) for a in args if a is not type(None)]
        plain = _plain(args)
        if len(plain) > 1 and all(isinstance(a, type) and issubclass(a, BaseModel) for a in plain):
            names = ["one of the types below"]
        return " or ".join(names) + (" or null" if type(None) in args else "")
    if origin is list:
        return f"list of {_type_name(args[0])}"
    if origin is dict:
        return f"map of {_type_name(args[1])}"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "section"
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return " \\| ".join(f"`{m.value}`" for m in annotation)
    simple = {str: "string", int: "integer", float: "number", bool: "boolean", Path: "path"}
    simple[Any] = "any value"
    metadata = list(metadata or [])
    metadata += [m for f in metadata if isinstance(f, FieldInfo) for m in f.metadata]
    if annotation is int and any(getattr(m, "gt", None) == 0 for m in metadata):
        return "integer > 0"
    return simple.get(annotation, getattr(annotation, "__name__", str(annotation)))


def _plain(args: tuple[Any, ...]) -> list[Any]:
    out = []
    for a in args:
        if a is type(None):
            continue
        if typing.get_origin(a) is Annotated:
            a = typing.get_args(a)[0]
        out.append(a)
    return out


def _models(annotation: Any) -> list[type[BaseModel]]:
    """The models a field holds (one; several for a tagged union), through list/dict/Optional."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is Annotated:
        return _models(args[0])
    if origin in (Union, types.UnionType):
        return [m for a in args for m in _models(a)]
    if origin is list:
        return _models(args[0])
    if origin is dict:
        return _models(args[1])
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return []


def _child_prefix(path: str, annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    if origin is Annotated:
        return _child_prefix(path, typing.get_args(annotation)[0])
    if origin in (Union, types.UnionType):
        inner = [a for a in typing.get_args(annotation) if a is not type(None)]
        return _child_prefix(path, inner[0]) if len(inner) == 1 else path
    if origin is list:
        return f"{path}[]"
    if origin is dict:
        return f"{path}.<name>"
    return path


def _default(path: str, info: FieldInfo) -> str:
    if path in DEFAULTS:
        return DEFAULTS[path]
    if info.is_required():
        return "required"
    factory = info.default_factory
    value = factory() if factory is not None else info.default  # type: ignore[call-arg]
    if value is PydanticUndefined:
        return "required"
    if isinstance(value, BaseModel):
        return ""
    return f"`{_yaml(value, path)}`"


def _yaml(value: Any, path: str) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, int) and "mode" in path.rsplit(".", 1)[-1]:
        return f'"{value:04o}"'
    if isinstance(value, float):
        return _duration(value) if value.is_integer() or value >= 1 else repr(value)
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, list):
        return "[" + ", ".join(_yaml(v, path) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_yaml(v, path)}" for k, v in value.items()) + "}"
    return str(value)


def _duration(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{seconds:g}s" if seconds else "0"


class Row(typing.NamedTuple):
    path: str
    variant: str  # the union member (``file``, ``pkcs11``...), or ""
    type: str
    default: str
    meaning: str


def rows(model: type[BaseModel] = c.AgentConfig, prefix: str = "") -> Iterator[Row]:
    """One row per field, depth first, in declaration order."""
    for name, info in model.model_fields.items():
        if info.exclude:
            continue  # base_dir, source: not YAML fields
        path = f"{prefix}.{name}" if prefix else name
        annotation = model.__annotations__.get(name, info.annotation)
        annotation = typing.get_type_hints(model, include_extras=True).get(name, annotation)
        yield Row(path, "", _type_name(annotation, info.metadata), _default(path, info), "")
        members = _models(annotation)
        child = _child_prefix(path, annotation)
        if len(members) == 1:
            yield from rows(members[0], child)
        else:
            for member in members:
                tag = member.model_fields["type"].annotation
                variant = typing.get_args(tag)[0]
                for row in rows(member, child):
                    yield row._replace(variant=variant)


def _meaning(row: Row, model_descriptions: dict[str, str]) -> str:
    return model_descriptions.get(row.path) or DESCRIPTIONS.get(row.path, "")


def _model_descriptions(model: type[BaseModel] = c.AgentConfig, prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    hints = typing.get_type_hints(model, include_extras=True)
    for name, info in model.model_fields.items():
        path = f"{prefix}.{name}" if prefix else name
        if info.description:
            out[path] = info.description
        child = _child_prefix(path, hints.get(name, info.annotation))
        for member in _models(hints.get(name, info.annotation)):
            out.update(_model_descriptions(member, child))
    return out


def problems() -> list[str]:
    """Fields with no meaning, and meanings of no field."""
    own = _model_descriptions()
    seen = {r.path for r in rows()}
    out = [f"{p}: no description" for p in sorted(seen) if p not in own and p not in DESCRIPTIONS]
    out += [f"{p}: in DESCRIPTIONS but not a field" for p in DESCRIPTIONS if p not in seen]
    return out


# --------------------------------------------------------------------------- rendering


def reference() -> str:
    """The generated block of docs/configuration.md (markers included)."""
    own = _model_descriptions()
    out = [BEGIN, ""]
    merged: dict[tuple[str, str, str], list[str]] = {}
    order: list[tuple[str, str, str]] = []
    sections: dict[str, list[tuple[str, str, str]]] = {}
    for row in rows():
        key = (row.path, row.type, row.default)
        if key not in merged:
            merged[key] = []
            order.append(key)
            sections.setdefault(row.path.split(".")[0].split("[")[0], []).append(key)
        if row.variant:
            merged[key].append(row.variant)
    meanings = {r.path: _meaning(r, own) for r in rows()}
    for section, keys in sections.items():
        out += [f"### `{section}`", "", "| field | type | default | meaning |", "|---|---|---|---|"]
        for path, type_, default in keys:
            variants = merged[(path, type_, default)]
            where = f" ({', '.join(variants)})" if variants else ""
            meaning = meanings[path].replace("|", "\\|")
            out.append(f"| `{path}`{where} | {type_} | {default} | {meaning} |")
        out.append("")
    out.append(END)
    return "\n".join(out)


def updated(text: str) -> str:
    """``text`` (docs/configuration.md) with its generated block replaced."""
    start, end = text.find(BEGIN), text.find(END)
    if start < 0 or end < 0:
        raise SystemExit(f"{DOC}: the generated-block markers are missing")
    return text[:start] + reference() + text[end + len(END) :]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m agent.config_docs", description=__doc__.splitlines()[0]
    )
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--write", action="store_true", help=f"rewrite {DOC.name}")
    mode.add_argument("--check", action="store_true", help="exit 1 if it is stale")
    args = parser.parse_args(argv)
    missing = problems()
    if missing:
        print("\n".join(missing), file=sys.stderr)
        print("add a description in agent/config_docs.py DESCRIPTIONS", file=sys.stderr)
        return 1
    if not (args.write or args.check):
        print(reference())
        return 0
    text = DOC.read_text(encoding="utf-8")
    new = updated(text)
    if args.check:
        if new != text:
            print(f"{DOC} is stale; regenerate it with: {REGENERATE}", file=sys.stderr)
            return 1
        return 0
    DOC.write_text(new, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
