"""SIGKILL during re-renders: the file is always a whole old or new version."""

from __future__ import annotations

import hashlib
import random
import subprocess
import sys
import textwrap
import time
from pathlib import Path

SIZE = 64 * 1024
TOTAL = 200

WRITER = textwrap.dedent("""
    import hashlib, sys
    from pathlib import Path
    from agent.render.writer import Owner, remove_stale_temps, write_file
    dest = Path(sys.argv[1])
    start, total, size = int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    remove_stale_temps(dest)  # what the agent's start-up probe does
    for i in range(start, total):
        body = bytes([i % 256]) * (size - 64)
        data = body + hashlib.sha256(body).hexdigest().encode()
        write_file(dest, data, mode=0o400, owner=Owner())
""")


def _check_whole(dest: Path) -> int:
    """Assert ``dest`` is one complete version; return its index (mod 256)."""
    data = dest.read_bytes()
    assert len(data) == SIZE, f"partial file: {len(data)} bytes"
    body, digest = data[:-64], data[-64:]
    assert hashlib.sha256(body).hexdigest().encode() == digest, "torn file"
    assert body == bytes([body[0]]) * len(body)
    return body[0]


def test_sigkill_at_random_points_never_leaves_a_partial_file(tmpfs: Path) -> None:
    dest = tmpfs / "big"
    rng = random.Random(1234)
    start, kills, last = 0, 0, -1
    root = str(Path(__file__).resolve().parents[2])
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        proc = subprocess.Popen(
            [sys.executable, "-c", WRITER, str(dest), str(start), str(TOTAL), str(SIZE)], cwd=root
        )
        time.sleep(rng.uniform(0.05, 0.25))
        if proc.poll() is None and kills < 30:
            proc.kill()
            kills += 1
        proc.wait()
        if dest.exists():
            last = _check_whole(dest)
            # Resume after the version on disk (the index is kept mod 256; TOTAL < 256).
            start = last + 1
        if proc.returncode == 0:
            break
    assert last == TOTAL - 1
    assert kills >= 3, "the writer finished before it could be interrupted often enough"
    # A restart cleaned every temporary file the kills left behind.
    subprocess.run(
        [sys.executable, "-c", WRITER, str(dest), str(TOTAL), str(TOTAL), str(SIZE)],
        cwd=root,
        check=True,
    )
    assert sorted(p.name for p in tmpfs.iterdir()) == ["big"]
