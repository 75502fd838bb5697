"""Pure rendering: secret values in, file bytes out. No I/O.

Every failure raises :class:`RenderError` whose message names the secret, the
key or the template line, never a value.
"""

from __future__ import annotations

import base64
import json
import re
import shlex
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import yaml
from jinja2 import StrictUndefined, TemplateError, TemplateSyntaxError, UndefinedError
from jinja2.sandbox import SandboxedEnvironment

from agent.config import TemplateConfig
from agent.errors import AgentError
from agent.types import Secret

_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_FILE_NAME = re.compile(r"[A-Za-z0-9_.-]{1,255}")


class RenderError(AgentError):
    """A template cannot be rendered (the last good file stays in place)."""

    code = "render_failed"
    status = 500


def _parsed(secret: Secret) -> Any:
    """The value as JSON if it is a JSON object or array, else as text (bytes if not UTF-8)."""
    if secret.value_type == "binary":
        return secret.value.reveal()
    try:
        text = secret.value.text()
    except UnicodeDecodeError:
        return secret.value.reveal()
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


def _key(secret: Secret, key: str) -> Any:
    """One top-level field of a JSON-object secret (RenderError naming the key, never a value)."""
    doc = _parsed(secret)
    if not isinstance(doc, dict):
        raise RenderError(f"secret {secret.name!r} is not a JSON object, so it has no key {key!r}")
    if key not in doc:
        raise RenderError(f"secret {secret.name!r} has no key {key!r}")
    return doc[key]


def _scalar_text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def env_quote(value: Any) -> str:
    """A double-quoted value that python-dotenv reads back exactly (interpolation on, its default).

    Inside double quotes python-dotenv decodes ``\\``, ``\"``, ``\n`` and
    ``\r``; everything else is literal, so only those are escaped. It has no
    escape for ``$``, and by default expands ``${NAME}`` in every value: each
    ``${`` is written ``${:-$}{``, which it expands to ``${`` (an empty name is
    never set, so the default ``$`` is used). A reader with interpolation off
    keeps ``${:-$}`` literally: see docs/rendering.md for which reader is which.
    """
    text = _scalar_text(value)
    for a, b in (("\\", "\\\\"), ('"', '\\"'), ("\n", "\\n"), ("\r", "\\r")):
        text = text.replace(a, b)
    return '"' + text.replace("${", "${:-$}{") + '"'


def shell_quote(value: Any) -> str:
    """A POSIX-shell single-quoted word: exact under ``. file`` in sh, bash, dash and zsh."""
    text = _scalar_text(value)
    return "'" + text.replace("'", "'\\''") + "'"


def render_raw(secret: Secret, key: str | None) -> bytes:
    if key is None:
        return secret.value.reveal()
    return _scalar_text(_key(secret, key)).encode()


def render_json(secret: Secret, key: str | None) -> bytes:
    if key is not None:
        doc = _key(secret, key)
    else:
        doc = _parsed(secret)
        if isinstance(doc, bytes):
            doc = base64.b64encode(doc).decode()
    return (json.dumps(doc, indent=2, ensure_ascii=False) + "\n").encode()


def _assignments(secret: Secret, fmt: str, quote: Callable[[Any], str]) -> bytes:
    lines = []
    for name, value in _object(secret, fmt).items():
        if not _ENV_NAME.fullmatch(name):
            raise RenderError(
                f"secret {secret.name!r}: key {name!r} is not a valid environment variable name"
            )
        if "\x00" in _scalar_text(value):
            raise RenderError(
                f"secret {secret.name!r}: key {name!r} holds a NUL character, which no "
                "environment variable can"
            )
        lines.append(f"{name}={quote(value)}\n")
    return "".join(lines).encode()


def render_dotenv(secret: Secret) -> bytes:
    """``KEY="value"`` lines, as python-dotenv reads them (see :func:`env_quote`)."""
    return _assignments(secret, "dotenv", env_quote)


def render_shell(secret: Secret) -> bytes:
    """``KEY='value'`` lines, for ``set -a; . file`` in a POSIX shell."""
    return _assignments(secret, "shell", shell_quote)


def render_yaml(secret: Secret) -> bytes:
    doc = _object(secret, "yaml")
    return yaml.safe_dump(doc, sort_keys=False, allow_unicode=True).encode()


def render_files(secret: Secret) -> dict[str, bytes]:
    files = {}
    for name, value in _object(secret, "files").items():
        if not _FILE_NAME.fullmatch(name) or name == "." or name.startswith(".."):
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


def render_template(text: str, secrets: Mapping[str, Secret]) -> bytes:
    """Render Jinja2 ``text`` in the sandbox; undefined names are errors.

    The template sees ``secrets[name]`` (a JSON object or array parsed, else
    the text) and ``secret(name, key=None)``. Error messages are scrubbed of
    the secrets' values: a template can use a value as a key or attribute
    name, and Jinja would then quote it in its "undefined" message.
    """
    values = {name: _parsed(s) for name, s in secrets.items()}

    def secret(name: str, key: str | None = None) -> Any:
        if name not in secrets:
            raise RenderError(f"template uses secret {name!r}, which it does not list")
        return values[name] if key is None else _key(secrets[name], key)

    try:
        return _ENV.from_string(text).render(secrets=values, secret=secret).encode()
    except UndefinedError as exc:
        message = f"undefined in template: {exc.message}"
    except TemplateSyntaxError as exc:
        message = f"template syntax error, line {exc.lineno}: {exc.message}"
    except TemplateError as exc:
        message = f"template error: {type(exc).__name__}: {exc.message}"
    except RenderError as exc:
        message = exc.message
    except Exception as exc:
        # A filter failed on some value: say which kind of failure, never the value.
        kind = type(exc)
        name = (
            kind.__qualname__
            if kind.__module__ == "builtins"
            else f"{kind.__module__}.{kind.__qualname__}"
        )
        message = f"template failed: {name}"
    raise RenderError(scrub(message, values.values())) from None


def _leaves(value: Any) -> list[str]:
    if isinstance(value, dict):
        return [s for v in value.values() for s in _leaves(v)]  # keys are names, not secrets
    if isinstance(value, list):
        return [s for v in value for s in _leaves(v)]
    if isinstance(value, bytes):
        return [value.decode("utf-8", "replace")]
    return [_scalar_text(value)]


def scrub(message: str, values: Iterable[Any]) -> str:
    """``message`` with every string in ``values`` (4+ characters) replaced by ``<redacted>``."""
    leaves = {s for v in values for s in _leaves(v) if len(s) >= 4}
    for leaf in sorted(leaves, key=len, reverse=True):
        message = message.replace(leaf, "<redacted>")
    return message


def render(
    cfg: TemplateConfig, secrets: Mapping[str, Secret], *, template_text: str | None = None
) -> bytes | dict[str, bytes]:
    """The bytes of one template (or, for ``files``, the bytes of each file)."""
    if cfg.format == "template":
        assert template_text is not None
        return render_template(template_text, secrets)
    (secret,) = secrets.values()
    if cfg.format == "raw":
        return render_raw(secret, cfg.key)
    if cfg.format == "json":
        return render_json(secret, cfg.key)
    if cfg.format == "dotenv":
        return render_dotenv(secret)
    if cfg.format == "shell":
        return render_shell(secret)
    if cfg.format == "yaml":
        return render_yaml(secret)
    return render_files(secret)
