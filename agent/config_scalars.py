"""Config building blocks: scalar types (durations, modes, sizes, paths, secret
references), machine-dependent defaults and the frozen model base (see :mod:`agent.config`).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationInfo,
)

from agent.errors import ConfigError
from agent.fsowner import denied_suffix

# --------------------------------------------------------------------------- scalar types

_DURATION_PART = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*(ns|us|µs|ms|s|m|h|d)")
_UNITS = {
    "ns": 1e-9,
    "us": 1e-6,
    "µs": 1e-6,
    "ms": 0.001,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
    "d": 86400.0,
}


def parse_duration(value: object) -> float:
    """Seconds from a duration as Go, Vault and consul-template users write it.

    ``"500ms"``, ``"90s"``, ``"1.5h"``, ``"2d"``, and compounds like ``"1h30m"``
    or ``"1m30.5s"`` (parts add up, in any order); a bare number is seconds.
    Hand-rolled: Go's ``time.ParseDuration`` grammar plus ``d`` is one regex,
    and pydantic's duration type reads ISO 8601 (``PT1H30M``), not this.
    """
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0:
        return float(value)  # a bare number is seconds
    if isinstance(value, str) and value.strip():
        total, pos, text = 0.0, 0, value.strip()
        for m in _DURATION_PART.finditer(text):
            if m.start() != pos:
                break
            total += float(m.group(1)) * _UNITS[m.group(2)]
            pos = m.end()
        else:
            if pos == len(text):
                return total
    raise ValueError(
        f'expected a duration like "500ms", "30s", "5m", "24h" or "30d", got {value!r}'
    )


def _parse_mode(value: object) -> int:
    if isinstance(value, str) and re.fullmatch(r"0?[0-7]{3}", value):
        return int(value, 8)
    hint = (
        " (quote it in YAML: an unquoted 0400 is read as a number)"
        if isinstance(value, int)
        else ""
    )
    raise ValueError(f'expected an octal string like "0400", got {value!r}{hint}')


def _resolve_path(value: Path, info: ValidationInfo) -> Path:
    base = (info.context or {}).get("base_dir")
    value = value.expanduser()
    if not value.is_absolute() and base is not None:
        value = Path(base) / value
    return Path(os.path.normpath(value))


def _check_secret_ref(value: str) -> str:
    if not (
        (value.startswith("env:") and len(value) > 4)
        or (value.startswith("file:") and len(value) > 5)
    ):
        # Never echo the value: a literal here is likely a secret pasted in.
        raise ValueError(
            "expected a reference like env:VAR or file:///path/to/file, not a literal value"
        )
    return value


Duration = Annotated[float, BeforeValidator(parse_duration)]
Mode = Annotated[int, BeforeValidator(_parse_mode)]
ConfigPath = Annotated[Path, AfterValidator(_resolve_path)]
SecretRef = Annotated[str, AfterValidator(_check_secret_ref)]
PositiveInt = Annotated[int, Field(gt=0)]
#: A schedule period: any duration of one second or more.
Period = Annotated[float, BeforeValidator(parse_duration), Field(ge=1.0)]


def read_secret_ref(ref: str, *, base_dir: Path | None = None) -> bytes:
    """Read the material a ``env:VAR`` or ``file:PATH`` reference points at.

    Raises:
        ConfigError: the variable is unset or the file unreadable. The message
            names the reference, never its content.
    """
    if ref.startswith("env:"):
        var = ref[4:]
        if var not in os.environ:
            raise ConfigError(f"environment variable {var} (from {ref!r}) is not set")
        return os.environ[var].encode()
    path = Path(ref[7:] if ref.startswith("file://") else ref[5:])
    if not path.is_absolute() and base_dir is not None:
        path = base_dir / path
    try:
        return path.read_bytes().rstrip(b"\r\n")
    except OSError as exc:
        why = f"{exc.strerror}{denied_suffix(exc, path)}"
        raise ConfigError(f"cannot read {ref!r}: {why}") from None


def default_socket_path() -> Path:
    """``/run/secrets-agent/agent.sock`` for root, else ``$XDG_RUNTIME_DIR/secrets-agent/``,
    else ``~/.cache/secrets-agent/`` (never a predictable path under /tmp that
    another user could create first; the agent checks the directory at bind)."""
    if os.geteuid() == 0:
        return Path("/run/secrets-agent/agent.sock")
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg:
        return Path(xdg) / "secrets-agent" / "agent.sock"
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "secrets-agent" / "agent.sock"


def split_host_port(value: str) -> tuple[str, int]:
    """``"127.0.0.1:2773"`` / ``"[::1]:2773"`` to ``(host, port)``."""
    m = re.fullmatch(r"\[([0-9a-fA-F:.]+)\]:(\d{1,5})|([^:\[\]]+):(\d{1,5})", value or "")
    if not m:
        raise ValueError(f'expected "host:port" like "127.0.0.1:2773", got {value!r}')
    host = m.group(1) or m.group(3)
    port = int(m.group(2) or m.group(4))
    if not 0 <= port <= 65535:
        raise ValueError(f"port out of range in {value!r}")
    return host, port


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)
