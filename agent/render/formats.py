"""Pure rendering: secret values in, file bytes out. No I/O.

Every failure raises :class:`RenderError` whose message names the secret, the
key or the template line, never a value.
"""

from __future__ import annotations

import base64
import json
import re
import shlex
from collections.abc import Mapping
from typing import Any

import yaml
from jinja2 import StrictUndefined, TemplateError, UndefinedError
from jinja2.sandbox import SandboxedEnvironment

from agent.config import TemplateConfig
from agent.errors import AgentError, KeyNotFound
from agent.types import Secret

_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_FILE_NAME = re.compile(r"[A-Za-z0-9_.-]{1,255}")


class RenderError(AgentError):
    """A template cannot be rendered (the last good file stays in place)."""

    code = "render_failed"
    status = 500


def _parsed(secret: Secret) -> Any:
    """The value as JSON if it is a JSON object or array, else as text."""
    if secret.value_type == "binary":
        return secret.value.reveal()
    text = secret.value.text()
    try:
        doc = json.loads(text)
    except ValueError:
        return text
    return doc if isinstance(doc, (dict, list)) else text


def _object(secret: Secret, fmt: str) -> dict[str, Any]:
    doc = _parsed(secret)
    if not isinstance(doc, dict):
        raise RenderError(f"format {fmt!r} needs secret {secret.name!r} to be a JSON object")
    return doc


def _scalar_text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def env_quote(value: Any) -> str:
    """A dotenv-safe double-quoted value (backslash, quote, $, backtick, newline escaped)."""
    text = _scalar_text(value)
    for a, b in (
        ("\\", "\\\\"),
        ('"', '\\"'),
        ("$", "\\$"),
        ("`", "\\`"),
        ("\n", "\\n"),
        ("\r", "\\r"),
    ):
        text = text.replace(a, b)
    return f'"{text}"'


def render_raw(secret: Secret, key: str | None) -> bytes:
    if key is None:
        return secret.value.reveal()
    try:
        return _scalar_text(secret.value.json_key(key)).encode()
    except KeyNotFound as exc:
        raise RenderError(f"secret {secret.name!r}: {exc.message}") from None


def render_json(secret: Secret, key: str | None) -> bytes:
    if key is not None:
        try:
            doc = secret.value.json_key(key)
        except KeyNotFound as exc:
            raise RenderError(f"secret {secret.name!r}: {exc.message}") from None
    else:
        doc = _parsed(secret)
        if isinstance(doc, bytes):
            doc = base64.b64encode(doc).decode()
    return (json.dumps(doc, indent=2, ensure_ascii=False) + "\n").encode()


def render_dotenv(secret: Secret) -> bytes:
    lines = []
    for name, value in _object(secret, "dotenv").items():
        if not _ENV_NAME.fullmatch(name):
            raise RenderError(
                f"secret {secret.name!r}: key {name!r} is not a valid environment variable name"
            )
        lines.append(f"{name}={env_quote(value)}\n")
    return "".join(lines).encode()


def render_yaml(secret: Secret) -> bytes:
    doc = _object(secret, "yaml")
    return yaml.safe_dump(doc, sort_keys=False, allow_unicode=True).encode()


def render_files(secret: Secret) -> dict[str, bytes]:
    files = {}
    for name, value in _object(secret, "files").items():
        if not _FILE_NAME.fullmatch(name) or name.startswith(".."):
            raise RenderError(f"secret {secret.name!r}: key {name!r} is not a safe file name")
        files[name] = _scalar_text(value).encode()
    return files


def _environment() -> SandboxedEnvironment:
    env = SandboxedEnvironment(
        undefined=StrictUndefined, autoescape=False, keep_trailing_newline=True
    )
    env.filters.update(
        b64encode=lambda v: base64.b64encode(
            v if isinstance(v, bytes) else str(v).encode()
        ).decode(),
        b64decode=lambda v: base64.b64decode(str(v)).decode(),
        tojson=lambda v, indent=None: json.dumps(v, indent=indent, ensure_ascii=False),
        toyaml=lambda v: yaml.safe_dump(v, sort_keys=False, allow_unicode=True),
        shell_quote=lambda v: shlex.quote(_scalar_text(v)),
        env_quote=env_quote,
    )
    return env


_ENV = _environment()


def render_template(text: str, secrets: Mapping[str, Secret], *, where: str) -> bytes:
    """Render Jinja2 ``text`` in the sandbox; undefined names are errors.

    The template sees ``secrets[name]`` (a JSON object or array parsed, else
    the text) and ``secret(name, key=None)``.
    """
    values = {name: _parsed(s) for name, s in secrets.items()}

    def secret(name: str, key: str | None = None) -> Any:
        if name not in secrets:
            raise RenderError(f"template uses secret {name!r}, which it does not list")
        if key is None:
            return values[name]
        try:
            return secrets[name].value.json_key(key)
        except KeyNotFound as exc:
            raise RenderError(f"secret {name!r}: {exc.message}") from None

    try:
        return _ENV.from_string(text).render(secrets=values, secret=secret).encode()
    except UndefinedError as exc:
        raise RenderError(f"{where}: undefined in template: {exc.message}") from None
    except TemplateError as exc:
        # Jinja's own messages name template constructs, not values.
        raise RenderError(f"{where}: template error: {type(exc).__name__}: {exc.message}") from None
    except RenderError:
        raise
    except Exception as exc:
        # A filter failed on some value: say which kind of failure, never the value.
        raise RenderError(f"{where}: template failed: {type(exc).__name__}") from None


def render(
    cfg: TemplateConfig, secrets: Mapping[str, Secret], *, template_text: str | None = None
) -> bytes | dict[str, bytes]:
    """The bytes of one template (or, for ``files``, the bytes of each file)."""
    if cfg.format == "template":
        assert template_text is not None
        return render_template(template_text, secrets, where=str(cfg.destination))
    (secret,) = secrets.values()
    if cfg.format == "raw":
        return render_raw(secret, cfg.key)
    if cfg.format == "json":
        return render_json(secret, cfg.key)
    if cfg.format == "dotenv":
        return render_dotenv(secret)
    if cfg.format == "yaml":
        return render_yaml(secret)
    return render_files(secret)
