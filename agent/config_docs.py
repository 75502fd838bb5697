"""Generate the field reference in docs/configuration.md from the config model.

Fields, types and defaults come from :class:`agent.config.AgentConfig` itself;
the meaning of each field comes from its ``Field(description=...)`` if it has
one, else from :data:`~agent.config_descriptions.DESCRIPTIONS`. Every field
must have a meaning, and every entry of ``DESCRIPTIONS`` must name a field, so
the reference cannot drift from the model. Regenerate after changing the config model::

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
from agent.config_descriptions import DEFAULTS, DESCRIPTIONS

REGENERATE = "python -m agent.config_docs --write"
BEGIN = "<!-- BEGIN GENERATED: config reference -->"
END = "<!-- END GENERATED: config reference -->"
DOC = Path(__file__).resolve().parent.parent / "docs" / "configuration.md"


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
        print("add a description in agent/config_descriptions.py DESCRIPTIONS", file=sys.stderr)
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
