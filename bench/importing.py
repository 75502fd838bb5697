"""``secrets-agent import`` of N secrets into a fresh directory store, as a user runs it.

A JSON file of N name/value pairs (~100 B values) is imported by a whole
``python -m agent import`` process (its progress output is discarded);
the wall time from exec to exit is reported, with the rate.

    python -m bench.importing [--counts 1000,10000]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench._agentproc import init_dir


def one(count: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="sa-import-") as tmp:
        directory = Path(tmp)
        cfg = init_dir(directory, {"audit": {"path": None}})
        data = directory / "data.json"
        data.write_text(json.dumps({f"imp/s{i:06d}": f"{i:06d}-" + "v" * 93 for i in range(count)}))
        started = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, "-m", "agent", "-c", str(cfg), "import", str(data)],
            capture_output=True,
            timeout=1800,
            check=False,
        )
        wall = time.perf_counter() - started
        if proc.returncode != 0:
            raise RuntimeError(f"import failed: {proc.stderr.decode(errors='replace')[-500:]}")
        written = len(list((directory / "store" / "secrets" / "imp").iterdir()))
        return {"secrets": count, "import_s": wall, "rate": count / wall, "written": written}


def run(counts: list[int]) -> list[dict[str, Any]]:
    rows = []
    for count in counts:
        row = one(count)
        rows.append(row)
        print(
            f"  import {count:>6}: {row['import_s']:.2f}s ({row['rate']:.0f} secrets/s)",
            flush=True,
        )
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--counts", default="1000,10000")
    args = parser.parse_args()
    print(json.dumps(run([int(c) for c in args.counts.split(",")]), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
