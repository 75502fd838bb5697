"""Rendered env files read back exactly by their readers: python-dotenv, sh, and our import.

Hypothesis draws arbitrary values (any text but NUL, which no environment
variable can hold, and lone surrogates, which are not UTF-8).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
from dotenv import dotenv_values
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.commands.secrets import parse_import_file
from agent.config import TemplateConfig
from agent.render.formats import RenderError, render
from tests.render.conftest import make_secret

NAMES = st.from_regex(r"K_[A-Za-z0-9_]{0,8}", fullmatch=True)
VALUES = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"))
ENVS = st.dictionaries(NAMES, VALUES, max_size=6)


def _render(fmt: str, values: dict[str, str]) -> bytes:
    cfg = TemplateConfig.model_validate({"destination": "/dev/shm/x", "secret": "s", "format": fmt})
    out = render(cfg, {"s": make_secret("s", json.dumps(values))})
    assert isinstance(out, bytes)
    return out


def _written(data: bytes) -> Path:
    with tempfile.NamedTemporaryFile("wb", suffix=".env", delete=False) as fh:
        fh.write(data)
    return Path(fh.name)


@settings(max_examples=300, deadline=None)
@given(ENVS)
def test_dotenv_output_reads_back_exactly_with_python_dotenv(values: dict[str, str]) -> None:
    path = _written(_render("dotenv", values))
    try:
        assert dict(dotenv_values(path)) == values  # interpolation on: its default
    finally:
        path.unlink()


@pytest.mark.skipif(shutil.which("sh") is None, reason="no sh")
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ENVS)
def test_shell_output_reads_back_exactly_with_set_a_and_dot_in_sh(values: dict[str, str]) -> None:
    path = _written(_render("shell", values))
    try:
        script = 'set -a; . "$1"; for k in "$@"; do printf "%s\\0" "$k"; done; env -0'
        proc = subprocess.run(
            ["sh", "-c", script, "sh", str(path)],
            capture_output=True,
            timeout=20,
            check=True,
            env={"PATH": "/usr/bin:/bin"},
        )
    finally:
        path.unlink()
    env = dict(
        entry.split("=", 1)
        for entry in proc.stdout.decode("utf-8").split("\0")
        if entry.startswith("K_") and "=" in entry
    )
    assert env == values


@settings(max_examples=200, deadline=None)
@given(ENVS)
def test_import_reads_the_dotenv_output_back_to_the_same_values(values: dict[str, str]) -> None:
    path = _written(_render("dotenv", values))
    try:
        imported = parse_import_file(path, "dotenv")
    finally:
        path.unlink()
    assert {k: v.decode() for k, v in imported.items()} == values
    # ...and rendering what was imported gives the same file again.
    again = _render("dotenv", {k: v.decode() for k, v in imported.items()})
    assert again == _render("dotenv", values)


def test_the_issue_example_round_trips() -> None:
    """``p@ss"w$rd`x`` came back from python-dotenv with its backslashes kept."""
    values = {"password": 'p@ss"w$rd`x', "url": "${HOME}/x", "multi": "a\nb\r\nc\\"}
    path = _written(_render("dotenv", values))
    try:
        assert dict(dotenv_values(path)) == values
    finally:
        path.unlink()


def test_import_reads_dotenv_as_python_dotenv_does(tmp_path: Path) -> None:
    """Inline comments go, escapes are decoded, ``export`` is allowed (python-dotenv)."""
    path = tmp_path / ".env"
    path.write_text("# comment\nA=x # c\nexport B='q w'\nC=\"line\\nnext\"\nD=plain\nE=${D}-x\n")
    got = {k: v.decode() for k, v in parse_import_file(path, None).items()}
    assert got == {"A": "x", "B": "q w", "C": "line\nnext", "D": "plain", "E": "plain-x"}


@pytest.mark.parametrize(
    ("text", "message"),
    [("A=1\nNOVALUE\n", ":2: NOVALUE has no '='"), ("A=1\n'broken\n", ":2: not a dotenv")],
)
def test_a_bad_dotenv_line_is_an_error_naming_the_line(
    tmp_path: Path, text: str, message: str
) -> None:
    from agent.errors import BadRequest

    path = tmp_path / "x.env"
    path.write_text(text)
    with pytest.raises(BadRequest, match=message):
        parse_import_file(path, None)


def test_a_nul_character_is_refused_in_env_formats() -> None:
    for fmt in ("dotenv", "shell"):
        with pytest.raises(RenderError, match="key number 1 of its JSON object holds a NUL"):
            _render(fmt, {"K": "a\x00b"})
