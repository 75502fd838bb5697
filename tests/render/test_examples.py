"""Every example config in config/ validates."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.config import load_config

ROOT = Path(__file__).resolve().parents[2] / "config"
EXAMPLES = sorted(ROOT.rglob("*.yaml"))


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_example_config_is_valid(path: Path) -> None:
    load_config(path)


def test_there_is_an_example_per_format() -> None:
    formats = {load_config(p).templates[0].format for p in EXAMPLES if p.name.startswith("render-")}
    assert formats == {"raw", "json", "dotenv", "shell", "yaml", "files", "template"}
