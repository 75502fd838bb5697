"""Populate a directory store with N secrets quickly (bench set-up, not the code under test).

Envelopes are sealed by the agent's own writer code (``SecretWriter.seal``,
one data key per batch as the writer's data-key reuse allows), then laid out
in the directory store's format with plain writes (no fsync: the files only
have to exist for the benchmark that follows). Stage maps are written by the
writer, with their proof.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Any

from bench._agentproc import init_dir

PREFIX = "bench/s"


def name_of(i: int) -> str:
    return f"{PREFIX}{i:06d}"


async def populate(directory: Path, count: int, *, value_size: int = 100, **overrides: Any) -> Path:
    """``init`` into ``directory`` and write ``count`` secrets; return the config path."""
    from agent.config import load_config
    from agent.core import Core

    defaults = {
        "secrets": ["*"],
        "listen": {"socket": str(directory / "agent.sock")},
        "audit": {"path": str(directory / "audit.log")},
    }
    cfg = init_dir(directory, {**defaults, **overrides})
    config = load_config(cfg)
    core = Core.build(config)
    try:
        writer = core.writer()
        root = directory / "store" / "secrets"
        for i in range(count):
            name = name_of(i)
            vid = str(uuid.uuid4())
            value = (f"{i:06d}-" + "v" * value_size)[:value_size].encode()
            envelope = await writer.seal(name, vid, value, "string")
            versions = root.joinpath(*name.split("/")) / "versions"
            versions.mkdir(parents=True, mode=0o700, exist_ok=True)
            fd = os.open(versions / f"{vid}.json", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            os.write(fd, envelope)
            os.close(fd)
            # The stage map goes through the writer: it carries the proof that
            # agents require (issue 12), which a plain file write would lack.
            await writer.apply_stages(name, {"CURRENT": vid}, expected_revision="")
    finally:
        await core.aclose()
    return cfg
