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
from jinja2.exceptions import SecurityError
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
    for i, (name, value) in enumerate(_object(secret, fmt).items(), 1):
        # Keys are part of the value: an error names a key by its place only.
        if not _ENV_NAME.fullmatch(name):
            raise RenderError(
                f"secret {secret.name!r}: key number {i} of its JSON object is not a valid "
                "environment variable name (a letter or _, then letters, digits or _)"
            )
        if "\x00" in _scalar_text(value):
            raise RenderError(
                f"secret {secret.name!r}: key number {i} of its JSON object holds a NUL "
                "character, which no environment variable can"
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
    for i, (name, value) in enumerate(_object(secret, "files").items(), 1):
        if not _FILE_NAME.fullmatch(name) or name == "." or name.startswith(".."):
            raise RenderError(
                f"secret {secret.name!r}: key number {i} of its JSON object is not a safe "
                "file name (letters, digits, _ . -; not . or starting with ..)"
            )
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
    the text) and ``secret(name, key=None)``. A failure is reported by its
    kind, the template line and the secrets the template lists, never by
    Jinja's own message: a template can use a value as a key or attribute
    name (``secrets['a'][secrets['a'].password]``), and Jinja would quote it.
    """
    values = {name: _parsed(s) for name, s in secrets.items()}

    def secret(name: str, key: str | None = None) -> Any:
        if name not in secrets:
            raise _TemplateFault("uses a secret it does not list in 'secrets'")
        if key is None:
            return values[name]
        doc = values[name]
        if not isinstance(doc, dict) or key not in doc:
            raise _TemplateFault(f"asks secret {name!r} for a key it does not have")
        return doc[key]

    try:
        return _ENV.from_string(text).render(secrets=values, secret=secret).encode()
    except TemplateSyntaxError as exc:
        # The template text is configuration, not a value; its line is enough.
        message = f"template syntax error, line {exc.lineno}"
    except Exception as exc:
        # Only the kind is scrubbed: the rest is our wording, a line number and
        # the names the config lists, which a value that happens to contain
        # "secr" or equal "app" would otherwise garble.
        kind = scrub(_kind(exc), values.values())
        message = f"template {kind}{_template_line(exc)}"
    names = ", ".join(repr(n) for n in sorted(secrets))
    message = f"{message} (template over secrets {names})" if names else message
    raise RenderError(message) from None


class _TemplateFault(Exception):
    """A failure inside ``secret()`` whose message names no value."""


def _kind(exc: BaseException) -> str:
    """What went wrong, by kind only: never Jinja's text, which can quote a value."""
    if isinstance(exc, _TemplateFault):
        return str(exc)
    if isinstance(exc, UndefinedError):
        return "error: undefined name, key or attribute"
    if isinstance(exc, SecurityError):
        return "error: unsafe operation refused by the sandbox"
    if isinstance(exc, TemplateError):
        return f"error: {type(exc).__name__}"
    kind = type(exc)
    name = (
        kind.__qualname__
        if kind.__module__ == "builtins"
        else f"{kind.__module__}.{kind.__qualname__}"
    )
    return f"failed: {name} (a type or value error in an expression or filter)"


def _template_line(exc: BaseException) -> str:
    """``", line N"`` of the innermost template frame in ``exc``'s traceback, if any."""
    line = None
    tb = exc.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == "<template>":
            line = tb.tb_lineno
        tb = tb.tb_next
    return f", line {line}" if line is not None else ""


def _leaves(value: Any) -> list[str]:
    if isinstance(value, dict):
        return [s for v in value.values() for s in _leaves(v)]  # keys are names, not secrets
    if isinstance(value, list):
        return [s for v in value for s in _leaves(v)]
    if isinstance(value, bytes):
        return [value.decode("utf-8", "replace")]
    return [_scalar_text(value)]


_REDACTED = "<redacted>"
_GRAM = 4


def scrub(message: str, values: Iterable[Any]) -> str:
    """``message`` with every run of 4+ characters that occurs in any of ``values`` redacted,
    and any shorter value redacted where it stands alone (between non-word characters).

    "Every run": not only whole values, so a fragment of a value (a slice,
    one character short of the whole) is redacted too.
    """
    leaves = {s for v in values for s in _leaves(v)}
    grams = {
        leaf[i : i + _GRAM] for leaf in leaves if len(leaf) >= _GRAM for i in range(len(leaf) - 3)
    }
    covered = [False] * len(message)
    for i in range(len(message) - _GRAM + 1):
        if message[i : i + _GRAM] in grams:
            for j in range(i, i + _GRAM):
                covered[j] = True
    for leaf in (s for s in leaves if 0 < len(s) < _GRAM):
        for m in re.finditer(rf"(?<!\w){re.escape(leaf)}(?!\w)", message):
            for j in range(m.start(), m.end()):
                covered[j] = True
    out: list[str] = []
    i = 0
    while i < len(message):
        if covered[i]:
            while i < len(message) and covered[i]:
                i += 1
            out.append(_REDACTED)
        else:
            out.append(message[i])
            i += 1
    return "".join(out)


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
