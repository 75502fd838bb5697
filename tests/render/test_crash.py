"""SIGKILL during re-renders: the file is always a whole old or new version.

A child process runs the real renderer (probe at start, then 200 renders of a
64 KiB file: one repeated byte plus its SHA-256). The test kills it at random
points, restarts it from the version on disk, and checks (from a reader
thread while the child runs, and after each kill) that the file is complete,
and that each restart's probe removed the temporary files a kill left.
"""

from __future__ import annotations

import hashlib
import random
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

from agent import fsutil

SIZE = 64 * 1024
TOTAL = 200
MIN_KILLS = 5
MAX_KILLS = 12

WRITER = textwrap.dedent("""
    import asyncio, hashlib, sys
    from agent.config import RenderConfig, TemplateConfig
    from agent.metrics import Metrics
    from agent.render.renderer import Renderer
    from agent.types import Secret, SecretValue, utcnow

    dest, start, total, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])

    class Source:
        value = b""

        async def get(self, name, *, stage=None, version=None):
            return Secret(name=name, version_id="v", created_at=utcnow(),
                          value=SecretValue(self.value), value_type="binary", stages=("CURRENT",))

    async def main():
        source = Source()
        cfg = TemplateConfig.model_validate({"destination": dest, "secret": "big"})
        r = Renderer([cfg], source, render_config=RenderConfig(), metrics=Metrics())
        await r.probe()  # as the agent does at start: removes what a kill left
        print("ready", flush=True)
        sys.stdin.readline()  # the test checks the directory, then says go
        for i in range(start, total):
            body = bytes([i]) * (size - 64)
            source.value = body + hashlib.sha256(body).hexdigest().encode()
            assert await r.render_all() == []

    asyncio.run(main())
""")


def _check_whole(data: bytes) -> int:
    """Assert ``data`` is one complete version; return its index."""
    assert len(data) == SIZE, f"partial file: {len(data)} bytes"
    body, digest = data[:-64], data[-64:]
    assert hashlib.sha256(body).hexdigest().encode() == digest, "torn file"
    assert body == bytes([body[0]]) * len(body)
    return body[0]


class _Reader(threading.Thread):
    """Reads the file as fast as it can while the writer runs; records any bad read."""

    def __init__(self, dest: Path) -> None:
        super().__init__(daemon=True)
        self.dest = dest
        self.stop = threading.Event()
        self.reads = 0
        self.errors: list[str] = []

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                data = self.dest.read_bytes()
            except FileNotFoundError:
                continue
            self.reads += 1
            try:
                _check_whole(data)
            except AssertionError as exc:
                self.errors.append(str(exc))


def _temps(directory: Path) -> list[str]:
    return [p.name for p in directory.iterdir() if fsutil.is_temp_name(p.name)]


def _start(dest: Path, start: int, root: str) -> subprocess.Popen[bytes]:
    """Start a writer and wait until its start-up probe is done (it then waits for :func:`_go`)."""
    proc = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(dest), str(start), str(TOTAL), str(SIZE)],
        cwd=root,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    assert proc.stdout is not None
    ready = proc.stdout.readline()
    proc.stdout.close()  # the child prints nothing more
    assert ready == b"ready\n"
    return proc


def _go(proc: subprocess.Popen[bytes]) -> None:
    assert proc.stdin is not None
    proc.stdin.write(b"go\n")
    proc.stdin.close()


def test_sigkill_at_random_points_never_leaves_a_partial_file(tmpfs: Path) -> None:
    dest = tmpfs / "big"
    rng = random.Random(1234)
    root = str(Path(__file__).resolve().parents[2])
    start, kills, last, leftovers = 0, 0, -1, 0
    reader = _Reader(dest)
    reader.start()
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline:
            proc = _start(dest, start, root)
            # The probe has run: nothing an earlier kill left may remain.
            assert _temps(tmpfs) == []
            _go(proc)
            if kills < MAX_KILLS:
                time.sleep(rng.uniform(0, 0.01))
                proc.kill()
            code = proc.wait(timeout=60)
            kills += code == -signal.SIGKILL
            leftovers += bool(_temps(tmpfs))
            if dest.exists():
                last = _check_whole(dest.read_bytes())
            if code == 0 and kills >= MIN_KILLS:
                break
            assert code in (0, -signal.SIGKILL)
            # Resume after the version on disk; too few kills so far: go round again.
            start = 0 if code == 0 else last + 1
    finally:
        reader.stop.set()
        reader.join()
    assert kills >= MIN_KILLS, "the writer could not be interrupted often enough in 120 s"
    assert last == TOTAL - 1
    assert reader.errors == [] and reader.reads > 0
    # One more start-up with nothing to write: only the file remains.
    final = _start(dest, TOTAL, root)
    _go(final)
    assert final.wait(timeout=60) == 0
    assert sorted(p.name for p in tmpfs.iterdir()) == ["big"]
    print(f"{kills} kills, {leftovers} left temporary files, {reader.reads} concurrent reads")
