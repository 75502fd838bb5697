"""Fixtures for rendering tests: a real tmpfs mount, and secrets to render."""

from __future__ import annotations

import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.types import Secret, SecretValue, utcnow


@pytest.fixture
def tmpfs() -> Iterator[Path]:
    """A fresh tmpfs mounted for this test (needs root; /dev/shm as a fallback)."""
    directory = Path(tempfile.mkdtemp(prefix="sa-tmpfs-", dir="/tmp"))
    mounted = (
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=16m,mode=0755", "tmpfs", str(directory)],
            capture_output=True,
            check=False,
        ).returncode
        == 0
    )
    if not mounted:
        directory.rmdir()
        shm = Path("/dev/shm")
        if not shm.is_dir():
            pytest.skip("cannot mount a tmpfs (not root?) and /dev/shm does not exist")
        directory = Path(tempfile.mkdtemp(prefix="sa-tmpfs-", dir=shm))
    try:
        yield directory
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(directory)], check=False)
            directory.rmdir()
        else:
            subprocess.run(["rm", "-rf", str(directory)], check=False)


def make_secret(
    name: str, value: str | bytes, *, version: str = "v1", binary: bool = False
) -> Secret:
    data = value.encode() if isinstance(value, str) else value
    return Secret(
        name=name,
        version_id=version,
        created_at=utcnow(),
        value=SecretValue(data),
        value_type="binary" if binary else "string",
        stages=("CURRENT",),
    )


class DictSource:
    """A SecretSource over a dict, for unit tests (counts reads)."""

    def __init__(self, secrets: dict[str, Secret]) -> None:
        self.secrets = secrets
        self.reads = 0

    async def get(
        self, name: str, *, stage: str | None = None, version: str | None = None
    ) -> Secret:
        from agent.errors import SecretNotFound

        self.reads += 1
        if name not in self.secrets:
            raise SecretNotFound(f"secret {name!r} does not exist")
        return self.secrets[name]
