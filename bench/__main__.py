"""The benchmark suite: every scenario, JSON results, docs/benchmarks.md with plots.

    python -m bench [--quick] [--out DIR] [--docs PATH]

``--quick`` (CI) runs every scenario at small sizes in under two minutes and
checks that each produced its figures; it asserts no times. The full run
takes about half an hour on 2 cores. Figures from a shared machine are
noisy: each comparison (agent vs bare aiohttp, before vs after, cache on vs
off) is measured in the same run, alternating, and the load average is
recorded next to them.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench import coldstart, importing, reads, resync
from bench.report import write_report

FULL: dict[str, Any] = {
    "read_duration": 5.0,
    "concurrency": [1, 4, 16, 64],
    "cold_counts": [1000, 10000, 50000],
    "resync_counts": [1000, 10000, 50000],
    "keys_count": 2000,
    "propagation_rotations": 50,
    "fleet_agents": 50,
    "fleet_rotations": 20,
    "import_counts": [1000, 10000],
}
QUICK: dict[str, Any] = {
    "read_duration": 0.3,
    "concurrency": [1, 4],
    "cold_counts": [100],
    "resync_counts": [100],
    "keys_count": 20,
    "propagation_rotations": 2,
    "fleet_agents": 2,
    "fleet_rotations": 2,
    "import_counts": [100],
}
#: Every scenario's key in the results; --quick checks each produced something.
SCENARIOS = (
    "machine",
    "reads",
    "coldstart",
    "resync",
    "import",
    "keys",
    "propagation",
    "fleet",
    "model",
)


def machine() -> dict[str, Any]:
    """What ran the benchmark, and how busy the machine was."""
    cpu = "unknown"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as fh:
        for line in fh:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem_kb = 0
    with contextlib.suppress(OSError), open("/proc/meminfo") as fh:
        mem_kb = int(fh.readline().split()[1])
    return {
        "host": platform.node(),
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "memory_gb": round(mem_kb / 1024 / 1024, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "loadavg_start": os.getloadavg(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
    }


def _reads(p: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    loops = ["asyncio"]
    if shutil.which("true") and _has("uvloop"):
        loops.append("uvloop")
    for loop in loops:
        print(f"reads ({loop})", flush=True)
        result = reads.run(
            duration=p["read_duration"], concurrency=p["concurrency"], uvloop=loop == "uvloop"
        )
        result["ratios"] = reads.ratios(result)
        out[loop] = result
    return out


def _keys(p: dict[str, Any]) -> dict[str, Any]:
    """Key-provider calls per cold load with the data-key cache on and off (local keyring)."""
    from bench.keys import one_run

    rows = {}
    with tempfile.TemporaryDirectory(prefix="sa-keys-") as tmp:
        root = Path(tmp)
        keyring = root / "keyring.json"
        from agent.cli import main as cli

        with contextlib.redirect_stdout(None):
            cli(["init", "--dir", str(root / "init")])
        shutil.copy(root / "init" / "keyring.json", keyring)
        os.chmod(keyring, 0o600)
        keys = {"local": {"type": "local", "keyring": str(keyring)}}
        for cached in (True, False):
            r = asyncio.run(one_run(root, keys, "local", p["keys_count"], cached))
            rows["cache_on" if cached else "cache_off"] = {**r, "secrets": p["keys_count"]}
            print(f"  keys cache {'on ' if cached else 'off'}: {r}", flush=True)
    return rows


def _propagation(p: dict[str, Any]) -> dict[str, Any]:
    from bench.propagation import run_mode

    out: dict[str, Any] = {}
    render = Path("/dev/shm") if Path("/dev/shm").is_dir() else None
    for store_name, store in _stores():
        try:
            r = asyncio.run(
                run_mode(
                    push=True,
                    rotations=p["propagation_rotations"],
                    poll_interval="60s",
                    store=store,
                    render_root=render,  # type: ignore[arg-type]
                )
            )
        except Exception as exc:  # one store failing keeps the other's figures
            out[store_name] = {"error": f"{type(exc).__name__}: {exc}"}
            continue
        out[store_name] = r
        print(f"  propagation {store_name}: {len(r['socket'])} rotations", flush=True)
    return out


_ETCD: dict[str, Any] = {}


def _stores() -> list[tuple[str, dict[str, Any] | None]]:
    stores: list[tuple[str, dict[str, Any] | None]] = [("file", None)]
    endpoint = _ETCD.get("endpoint")
    if endpoint:
        stores.append(("etcd", {"type": "etcd", "endpoints": [endpoint], "prefix": "/bench-prop"}))
    return stores


def _fleet(p: dict[str, Any]) -> dict[str, Any]:
    from bench.fleet import run_fleet

    endpoint = _ETCD.get("endpoint")
    if not endpoint:
        return {"skipped": "etcd is not installed"}
    r = asyncio.run(run_fleet(endpoint, p["fleet_agents"], p["fleet_rotations"], idle=2.0))
    r["agents"] = p["fleet_agents"]
    print(f"  fleet of {p['fleet_agents']}: {len(r['latencies'])} rotations", flush=True)
    return r


def _has(module: str) -> bool:
    try:
        __import__(module)
    except ImportError:
        return False
    return True


def run_all(params: dict[str, Any], out: Path) -> dict[str, Any]:
    from bench.model import fleet_model

    results: dict[str, Any] = {"machine": machine(), "params": params}
    steps: list[tuple[str, Callable[[], Any]]] = [
        ("reads", lambda: _reads(params)),
        ("coldstart", lambda: coldstart.run(params["cold_counts"], settle=1.0)),
        ("resync", lambda: resync.run(params["resync_counts"])),
        ("import", lambda: importing.run(params["import_counts"])),
        ("keys", lambda: _keys(params)),
        ("propagation", lambda: _propagation(params)),
        ("fleet", lambda: _fleet(params)),
    ]
    with contextlib.ExitStack() as stack:
        if shutil.which("etcd") and _has("aetcd"):
            from bench.fleet import etcd_process

            tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="sa-etcd-")))
            _ETCD["endpoint"] = stack.enter_context(etcd_process(tmp))
        for name, step in steps:
            print(f"== {name}", flush=True)
            started = time.perf_counter()
            try:
                results[name] = step()
            except Exception as exc:  # one failed scenario must not lose the others
                traceback.print_exc()
                results[name] = {"error": f"{type(exc).__name__}: {exc}"}
            results.setdefault("durations", {})[name] = time.perf_counter() - started
            (out / "results.json").write_text(json.dumps(results, indent=1, default=str))
    results["model"] = fleet_model(results)
    results["machine"]["loadavg_end"] = os.getloadavg()
    (out / "results.json").write_text(json.dumps(results, indent=1, default=str))
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (CI): under 2 minutes")
    parser.add_argument("--out", default="bench/results", help="directory for JSON and plots")
    parser.add_argument("--docs", default="docs/benchmarks.md", help="the report to write")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=JSON",
        help='override one size, e.g. --set cold_counts="[1000,10000]"',
    )
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="write the report from OUT/results.json (e.g. of an interrupted run)",
    )
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.report_only:
        saved = json.loads((out / "results.json").read_text())
        saved.setdefault("model", __import__("bench.model").model.fleet_model(saved))
        write_report(saved, Path(args.docs), out)
        return 0
    params = dict(QUICK if args.quick else FULL)
    for item in args.set:
        key, _, value = item.partition("=")
        if key not in params:
            parser.error(f"--set: unknown key {key!r} (one of {', '.join(params)})")
        params[key] = json.loads(value)
    results = run_all({**params, "quick": args.quick}, out)
    write_report(results, Path(args.docs), out)
    missing = [s for s in SCENARIOS if not results.get(s) or "error" in results[s]]
    print(f"results in {out / 'results.json'}, report in {args.docs}")
    if missing:
        print(f"scenarios without figures: {', '.join(missing)}", file=sys.stderr)
    # The fleet needs an etcd the suite starts itself; a busy machine may fail it.
    return 1 if set(missing) - {"fleet"} else 0


if __name__ == "__main__":
    sys.exit(main())
