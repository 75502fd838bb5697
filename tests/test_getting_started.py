"""docs/getting-started.md, run command by command as written.

Every ``sh`` block of the guide runs, in order, in one bash with ``set -e``, in
a fresh directory that holds the repository's ``examples/`` (the guide runs
from the repository's root). Only the install lines are left out: the test's
venv is on PATH instead. As root the guide's socket is
/run/secrets-agent/agent.sock, so the script runs in a private mount namespace
with its own tmpfs on /run and /dev/shm, out of the way of any agent on the
machine.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

pytestmark = [pytest.mark.root, pytest.mark.integration]

ROOT = Path(__file__).resolve().parent.parent
GUIDE = ROOT / "docs" / "getting-started.md"
INSTALL = [
    "git clone <this repository> secrets-agent && cd secrets-agent",
    "python3 -m venv .venv",
    ".venv/bin/pip install -q -e .",
]


def _script() -> str:
    blocks = re.findall(r"```sh\n(.*?)```", GUIDE.read_text(), re.S)
    lines = "".join(blocks).splitlines()
    for line in INSTALL:
        assert line in lines, f"the guide's install changed ({line!r}); update this test"
    return "\n".join(line for line in lines if line not in INSTALL) + "\n"


def test_the_getting_started_guide_runs_as_written() -> None:
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("needs root and unshare for a private /run")
    work = Path(tempfile.mkdtemp(prefix="sa-guide-"))
    try:
        shutil.copytree(ROOT / "examples", work / "examples")
        (work / "guide.sh").write_text(
            "set -euo pipefail\n"
            # the guide's background agent must not outlive a failed step
            "trap 'kill $(jobs -p) 2>/dev/null || true' EXIT\n"
            "mount -t tmpfs -o mode=0755 tmpfs /run\n"
            "mount -t tmpfs -o mode=1777 tmpfs /dev/shm\n" + _script()
        )
        env = {
            "PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin",
            "HOME": str(work),
            "LANG": "C.UTF-8",
        }
        proc = subprocess.run(
            ["unshare", "-m", "--propagation", "private", "bash", str(work / "guide.sh")],
            cwd=work,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        out = proc.stdout
        # the app saw the first version, then the rotated one, from file and socket alike
        seen = re.findall(r"version (\S+): file and socket give the same value", out)
        assert len(seen) == 2 and seen[0] != seen[1], out
        assert f"rotated to version {seen[1]}" in out
        assert "correct horse battery staple" not in out + proc.stderr
        assert "ready: yes" in out
    finally:
        shutil.rmtree(work, ignore_errors=True)
