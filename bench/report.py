"""docs/benchmarks.md from one suite run: tables, PNG plots, the machine and its load."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from bench.loadclient import percentile

GOALS = """| measure | goal |
|---|---|
| cached read, 4 keep-alive clients, ratio to bare aiohttp (same run) | >= 0.9, p99 < 1 ms |
| `/ping`, ratio to bare aiohttp | >= 0.95 |
| cold start to `/readyz` 200, 10,000 secrets | < 2 s, 10,000 refreshes, <= 10 unwraps |
| cold start, 50,000 secrets | < 10 s, < 250 MB |
| RSS with 10,000 cached secrets | <= 100 MB |
| safety-net resync, 50,000 (10,000) secrets | < 10 s (< 1 s), reads p99 < 5 ms |
| `import` of 10,000 secrets | < 5 s, with progress |
"""


def _row(goal: str, measured: str, met: bool | None) -> str:
    verdict = "not measured" if met is None else ("met" if met else "**missed**")
    return f"| {goal} | {measured} | {verdict} |"


def _by(rows: Any, count: int) -> dict[str, Any] | None:
    for r in rows or []:
        if isinstance(r, dict) and r.get("secrets") == count:
            return r
    return None


def _status(results: dict[str, Any]) -> list[str]:
    """Each goal against this run's figure, and by how much it misses (computed, not typed)."""
    out = ["| goal | this run | status |", "|---|---|---|"]
    reads = (results.get("reads") or {}).get("asyncio") or {}
    rows = {(r["route"], r["concurrency"], r["target"]): r for r in reads.get("rows", [])}
    a, b = rows.get(("secret", 4, "agent")), rows.get(("secret", 4, "bare"))
    if a and b:
        ratio = a["rps"] / b["rps"]
        out.append(
            _row(
                "cached read ratio >= 0.9 at 4 clients",
                f"{ratio:.2f} ({a['rps']:.0f} vs {b['rps']:.0f} req/s; "
                f"{ratio / 0.9:.0%} of the goal)",
                ratio >= 0.9,
            )
        )
        out.append(_row("cached read p99 < 1 ms", f"{a['p99_ms']:.2f} ms", a["p99_ms"] < 1))
    else:
        out.append(_row("cached read ratio >= 0.9 at 4 clients", "-", None))
    a, b = rows.get(("ping", 4, "agent")), rows.get(("ping", 4, "bare"))
    if a and b:
        ratio = a["rps"] / b["rps"]
        out.append(_row("`/ping` ratio >= 0.95", f"{ratio:.2f}", ratio >= 0.95))
    cold = results.get("coldstart")
    r = _by(cold, 10000)
    if r:
        ok = r["ready_s"] < 2
        out.append(
            _row(
                "cold start 10k < 2 s",
                f"{r['ready_s']:.2f} s ({r['ready_s'] / 2:.1f}x the goal; "
                f"{r['cpu_ready_s']:.2f} s CPU)",
                ok,
            )
        )
        out.append(
            _row(
                "cold start 10k: 10,000 refreshes, <= 10 unwraps",
                f"{r['refreshes']:.0f} refreshes, {r['unwraps']:.0f} unwraps",
                r["refreshes"] == 10000 and r["unwraps"] <= 10,
            )
        )
        out.append(_row("RSS at 10k <= 100 MB", f"{r['rss_mb']:.0f} MB", r["rss_mb"] <= 100))
    else:
        out.append(_row("cold start 10k < 2 s", "-", None))
    r = _by(cold, 50000)
    if r:
        out.append(
            _row(
                "cold start 50k < 10 s, < 250 MB",
                f"{r['ready_s']:.2f} s ({r['ready_s'] / 10:.1f}x), {r['rss_peak_mb']:.0f} MB peak",
                r["ready_s"] < 10 and r["rss_peak_mb"] < 250,
            )
        )
    else:
        out.append(_row("cold start 50k < 10 s, < 250 MB", "-", None))
    for count, goal in ((10000, 1.0), (50000, 10.0)):
        r = _by(results.get("resync"), count)
        if r:
            c = r["unchanged"]
            out.append(
                _row(
                    f"resync {count // 1000}k < {goal:g} s, reads p99 < 5 ms",
                    f"{c['resync_s']:.2f} s ({c['resync_s'] / goal:.1f}x), "
                    f"reads p99 {c['read_p99_ms']:.2f} ms",
                    c["resync_s"] < goal and c["read_p99_ms"] < 5,
                )
            )
        else:
            out.append(_row(f"resync {count // 1000}k < {goal:g} s", "-", None))
    r = _by(results.get("import"), 10000)
    if r:
        out.append(
            _row(
                "`import` 10k < 5 s",
                f"{r['import_s']:.1f} s ({r['import_s'] / 5:.1f}x; {r['rate']:.0f} secrets/s)",
                r["import_s"] < 5,
            )
        )
    else:
        out.append(_row("`import` 10k < 5 s", "-", None))
    return out


def _f(value: Any, fmt: str = "{:.2f}") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return fmt.format(value)


def _reads_table(reads: dict[str, Any]) -> list[str]:
    lines = [
        "| loop | route | clients | agent req/s | bare req/s | ratio | agent p99 ms | "
        "bare p99 ms | agent CPU us/req | bare CPU us/req | client CPU (cores) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for loop, result in reads.items():
        if not isinstance(result, dict) or "rows" not in result:
            continue
        by = {(r["route"], r["concurrency"], r["target"]): r for r in result["rows"]}
        for (route, conc, target), a in by.items():
            if target != "agent":
                continue
            b = by[(route, conc, "bare")]
            cpu_a = a["server_cpu"] / a["rps"] * 1e6 if a["rps"] else None
            cpu_b = b["server_cpu"] / b["rps"] * 1e6 if b["rps"] else None
            lines.append(
                f"| {loop} | {route} | {conc} | {a['rps']:.0f} | {b['rps']:.0f} | "
                f"{a['rps'] / b['rps']:.2f} | {a['p99_ms']:.2f} | {b['p99_ms']:.2f} | "
                f"{_f(cpu_a, '{:.0f}')} | {_f(cpu_b, '{:.0f}')} | {a['client_cpu']:.2f} |"
            )
    return lines


def _plots(results: dict[str, Any], out: Path, docs: Path) -> list[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return ["(matplotlib is not installed: `pip install -e .[bench]` for the plots)"]
    lines = []
    images = docs.parent / "benchmarks"
    images.mkdir(parents=True, exist_ok=True)
    reads = results.get("reads") or {}
    if isinstance(reads.get("asyncio"), dict) and "rows" in reads["asyncio"]:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        for loop, result in reads.items():
            if not isinstance(result, dict) or "rows" not in result:
                continue
            for target in ("agent", "bare"):
                rows = [
                    r for r in result["rows"] if r["target"] == target and r["route"] == "secret"
                ]
                ax.plot(
                    [r["concurrency"] for r in rows],
                    [r["rps"] for r in rows],
                    marker="o",
                    label=f"{target} ({loop})",
                )
        ax.set_xscale("log", base=2)
        ax.set_xlabel("keep-alive connections")
        ax.set_ylabel("requests/s")
        ax.set_title("Cached GET /v1/secrets/NAME vs bare aiohttp")
        ax.legend()
        fig.tight_layout()
        fig.savefig(images / "reads.png", dpi=90)
        plt.close(fig)
        lines.append("![cached reads](benchmarks/reads.png)")
    cold = [r for r in results.get("coldstart") or [] if isinstance(r, dict) and "secrets" in r]
    rs = [r for r in results.get("resync") or [] if isinstance(r, dict) and "secrets" in r]
    if cold:
        fig, ax1 = plt.subplots(figsize=(6, 3.5))
        n = [r["secrets"] for r in cold]
        ax1.plot(n, [r["ready_s"] for r in cold], marker="o", label="cold start to ready (s)")
        ax1.plot(n, [r["cpu_ready_s"] for r in cold], marker="o", label="agent CPU to ready (s)")
        if rs:
            ax1.plot(
                [r["secrets"] for r in rs],
                [r["unchanged"]["resync_s"] for r in rs],
                marker="o",
                label="resync pass (s)",
            )
        ax1.set_xscale("log")
        ax1.set_xlabel("secrets")
        ax1.set_ylabel("seconds")
        ax2 = ax1.twinx()
        ax2.plot(n, [r["rss_mb"] for r in cold], "k--", marker="s", label="RSS (MB)")
        ax2.set_ylabel("RSS MB")
        ax1.legend(loc="upper left", fontsize=8)
        ax2.legend(loc="lower right", fontsize=8)
        ax1.set_title("Scaling with the number of secrets")
        fig.tight_layout()
        fig.savefig(images / "scaling.png", dpi=90)
        plt.close(fig)
        lines.append("![scaling](benchmarks/scaling.png)")
    return lines


def write_report(results: dict[str, Any], docs: Path, out: Path) -> None:
    m = results["machine"]
    quick = results["params"].get("quick")
    lines = [
        "# Benchmarks",
        "",
        "Written by `python -m bench`"
        + (" --quick (small sizes: a smoke run, not figures to quote)" if quick else "")
        + f" on {m['started']}. Raw results: `{out}/results.json`.",
        "",
        f"Machine: {m['cpus']} x {m['cpu']}, {m['memory_gb']} GB, Linux {m['kernel']}, "
        f"Python {m['python']}. Load average at start "
        f"{', '.join(f'{x:.1f}' for x in m['loadavg_start'])}, at end "
        f"{', '.join(f'{x:.1f}' for x in m.get('loadavg_end', ()))}. On a shared machine "
        "absolute times are noisy: quote the ratios measured in the same run, and CPU "
        "seconds, which depend less on the load.",
        "",
        "## Goals (issue 13)",
        "",
        GOALS,
        "## Status against the goals (this run)",
        "",
        "Computed from this run's figures. What was tried for each miss, with the "
        "profiles, is in [performance.md](performance.md).",
        "",
        *_status(results),
        "",
        "## Cached reads",
        "",
        "A real agent (default config: access rules and audit on) and a bare aiohttp "
        "server on a Unix socket answering the same body, driven alternately by the same "
        "closed-loop keep-alive client (bench/loadclient.py, plain sockets, up to 4 "
        "processes). The client's CPU is shown to show it is not the limit.",
        "",
        *_reads_table(results.get("reads") or {}),
        "",
        "## Cold start and memory",
        "",
        "Whole processes: exec of `python -m agent run` to `/readyz` 200, directory store, "
        "secrets of ~100 B; refreshes and unwraps counted by the agent's metrics after it "
        "settles.",
        "",
        "| secrets | ready s | agent CPU to ready s | refreshes | unwraps | RSS MB | peak MB |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results.get("coldstart") or []:
        if isinstance(r, dict) and "secrets" in r:
            lines.append(
                f"| {r['secrets']} | {r['ready_s']:.2f} | {r['cpu_ready_s']:.2f} | "
                f"{r['refreshes']:.0f} | {r['unwraps']:.0f} | {r['rss_mb']:.0f} | "
                f"{r['rss_peak_mb']:.0f} |"
            )
    lines += [
        "",
        "## Resync",
        "",
        "One safety-net pass in process (bench/resync.py) while a reader task reads cached "
        "secrets; the read latency shows how much the pass holds the event loop.",
        "",
        "| secrets | case | pass s | reads meanwhile | read p99 ms | read max ms |",
        "|---|---|---|---|---|---|",
    ]
    for r in results.get("resync") or []:
        if isinstance(r, dict) and "secrets" in r:
            for case in ("unchanged", "1pct_rotated"):
                c = r[case]
                lines.append(
                    f"| {r['secrets']} | {case} | {c['resync_s']:.2f} | {c['reads']} | "
                    f"{c['read_p99_ms']:.2f} | {c['read_max_ms']:.1f} |"
                )
    lines += ["", "## Import", ""]
    for r in results.get("import") or []:
        if isinstance(r, dict) and "secrets" in r:
            lines.append(
                f"- {r['secrets']} secrets: {r['import_s']:.2f} s ({r['rate']:.0f} secrets/s), "
                f"{r['written']} written"
            )
    keys = results.get("keys") or {}
    lines += ["", "## Key-provider calls: data-key cache on and off", ""]
    if "cache_on" in keys:
        lines += [
            "| data-key cache | secrets | wraps (import) | unwraps (cold load) | load s |",
            "|---|---|---|---|---|",
        ]
        for label in ("cache_on", "cache_off"):
            k = keys[label]
            lines.append(
                f"| {label[6:]} | {k['secrets']} | {k['wraps']:.0f} | {k['unwraps']:.0f} | "
                f"{k['load_s']:.2f} |"
            )
    else:
        lines.append(f"not measured: {keys}")
    lines += ["", "## Propagation of a rotation", ""]
    for store, r in (results.get("propagation") or {}).items():
        if isinstance(r, dict) and r.get("socket"):
            ms = [v * 1000 for v in r["socket"]]
            lines.append(
                f"- {store}: to the socket p50 {percentile(ms, 50):.1f} ms, p99 "
                f"{percentile(ms, 99):.1f} ms over {len(ms)} rotations"
            )
    fleet = results.get("fleet") or {}
    lines += ["", "## Fleet", ""]
    if fleet.get("latencies"):
        ms = [v * 1000 for v in fleet["latencies"]]
        lines.append(
            f"{fleet['agents']} agents on one etcd: until all serve a rotation p50 "
            f"{percentile(ms, 50):.0f} ms, p99 {percentile(ms, 99):.0f} ms "
            f"({len(ms)} rotations); etcd requests/s idle {fleet['idle_rps']:.1f}, "
            f"during rotations {fleet['busy_rps']:.1f}."
        )
    else:
        lines.append(f"not measured: {fleet}")
    model = results.get("model") or {}
    lines += ["", "### Model: 10,000 agents", "", f"Assumptions: {model.get('assumptions')}.", ""]
    lines += ["| quantity | value |", "|---|---|"]
    for key, value in model.items():
        if key != "assumptions":
            lines.append(
                f"| {key} | {_f(value, '{:,.1f}') if isinstance(value, float) else value} |"
            )
    lines += ["", "## Plots", "", *_plots(results, out, docs), ""]
    docs.parent.mkdir(parents=True, exist_ok=True)
    docs.write_text("\n".join(lines) + "\n")
