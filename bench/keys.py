"""What do key providers cost? Unwraps and wall time per cold start, and re-encryption.

For each provider (local keyring, SoftHSM2 over PKCS#11, AWS KMS on moto's
standalone server over HTTP) and N secrets (default 10,000):

1. import N secrets through the writer (counting wraps);
2. cold-start an agent cache over them (counting unwraps and timing the load),
   with data-key caching and reuse on (defaults), then off
   (``max_messages: 1``, ``cache_capacity: 1``) as the baseline;

then re-encrypt N secrets from the local keyring to the HSM, timing it and
counting HSM calls. Servers run on loopback (or in-process for SoftHSM) and
are stopped by pid. Every loop is bounded by N.

    python bench/keys.py [--count 10000] [--providers local,hsm,kms]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.servers import find_softhsm_module

PIN = "1234"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def moto(root: Path) -> Iterator[str]:
    port = _free_port()
    exe = Path(sys.executable).parent / "moto_server"
    proc = subprocess.Popen(
        [str(exe), "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError):
                urllib.request.urlopen(f"{url}/moto-api/", timeout=1)
                break
            time.sleep(0.1)
        os.environ.update(
            AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1"
        )
        yield url
    finally:
        os.kill(proc.pid, signal.SIGTERM)
        proc.wait(timeout=10)


def softhsm(root: Path) -> dict[str, str]:
    module = find_softhsm_module()
    if module is None:
        raise SystemExit("softhsm2 is not installed (scripts/install-deps.sh installs it)")
    tokens = root / "tokens"
    tokens.mkdir()
    conf = root / "softhsm2.conf"
    conf.write_text(f"directories.tokendir = {tokens}\nobjectstore.backend = file\n")
    os.environ["SOFTHSM2_CONF"] = str(conf)
    subprocess.run(
        [
            "softhsm2-util",
            "--init-token",
            "--free",
            "--label",
            "bench",
            "--pin",
            PIN,
            "--so-pin",
            "5678",
        ],
        check=True,
        capture_output=True,
    )
    os.environ["BENCH_HSM_PIN"] = PIN
    return {
        "type": "pkcs11",
        "module": module,
        "token": "bench",
        "pin": "env:BENCH_HSM_PIN",
        "key": "bench-master",
    }


def key_ops(metrics: Any, provider: str, operation: str) -> int:
    return int(
        metrics.registry.get_sample_value(
            "secrets_agent_key_operations_total",
            {"provider": provider, "operation": operation, "outcome": "ok"},
        )
        or 0
    )


def all_key_ops(metrics: Any, provider: str) -> int:
    """Every call to ``provider``, whatever the operation and outcome."""
    total = 0.0
    for family in metrics.registry.collect():
        for sample in family.samples:
            if sample.name == "secrets_agent_key_operations_total":
                total += sample.value if sample.labels.get("provider") == provider else 0
    return int(total)


async def one_run(
    root: Path, keys: dict[str, Any], provider: str, count: int, cached: bool
) -> dict[str, float]:
    from agent.cache import SecretCache
    from agent.config import parse_config
    from agent.core import Core
    from agent.metrics import Metrics
    from agent.refresh import Refresher

    datakeys = {} if cached else {"max_messages": 1, "cache_capacity": 1}
    store = root / f"store-{provider}-{'on' if cached else 'off'}"
    store.mkdir()
    config = parse_config(
        {
            "keys": keys,
            "write_keys": [provider],
            "datakeys": datakeys,
            "store": {"type": "file", "path": str(store)},
            "secrets": ["bench/*"],
        },
        base_dir=root,
    )
    writer_core = Core.build(config)
    if provider == "hsm":
        await writer_core.providers["hsm"].create_key()  # type: ignore[attr-defined]
    started = time.perf_counter()
    sem = asyncio.Semaphore(16)
    writer = writer_core.writer()

    async def put(i: int) -> None:
        async with sem:
            await writer.put(f"bench/s{i:05d}", f"value-{i}".encode())

    await asyncio.gather(*(put(i) for i in range(count)))
    import_s = time.perf_counter() - started
    wraps = key_ops(writer_core.metrics, provider, "wrap")
    await writer_core.aclose()
    metrics = Metrics()
    core = Core.build(config, metrics=metrics)
    cache = SecretCache(core.resolver, settings=config.refresh, metrics=metrics)
    refresher = Refresher(
        cache, core.store, settings=config.refresh, patterns=config.secrets, metrics=metrics
    )
    started = time.perf_counter()
    await refresher.load_all()
    load_s = time.perf_counter() - started
    assert len(cache.names()) == count
    unwraps = key_ops(metrics, provider, "unwrap")
    await cache.aclose()
    await core.aclose()
    shutil.rmtree(store, ignore_errors=True)
    return {"import_s": import_s, "wraps": wraps, "load_s": load_s, "unwraps": unwraps}


async def reencrypt_run(root: Path, keys: dict[str, Any], count: int) -> dict[str, float]:
    from agent.config import parse_config
    from agent.core import Core
    from agent.reencrypt import Reencryptor, target_recipients

    store = root / "store-reencrypt"
    store.mkdir()
    config = parse_config(
        {"keys": keys, "write_keys": ["local"], "store": {"type": "file", "path": str(store)}},
        base_dir=root,
    )
    writer_core = Core.build(config)
    writer = writer_core.writer()
    for i in range(count):
        await writer.put(f"bench/s{i:05d}", f"value-{i}".encode())
    await writer_core.aclose()
    core = Core.build(config)  # a cold process, as `secrets-agent reencrypt` is
    await core.providers["hsm"].create_key()  # type: ignore[attr-defined]
    started = time.perf_counter()
    report = await Reencryptor(core, target_recipients(core, add=["hsm"], remove=["local"])).run(
        None
    )
    elapsed = time.perf_counter() - started
    hsm_calls = all_key_ops(core.metrics, "hsm")
    local_unwraps = key_ops(core.metrics, "local", "unwrap")
    await core.aclose()
    return {
        "seconds": elapsed,
        "rewrapped": report.rewrapped,
        "hsm_calls": hsm_calls,
        "unwraps": local_unwraps,
    }


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=10_000)
    parser.add_argument("--providers", default="local,hsm,kms")
    parser.add_argument("--no-reencrypt", action="store_true")
    args = parser.parse_args()
    wanted = args.providers.split(",")
    with (
        tempfile.TemporaryDirectory(prefix="sa-keys-", dir="/dev/shm") as tmp,
        contextlib.ExitStack() as stack,
    ):
        root = Path(tmp)
        from agent.keys.local import LocalKeyring

        LocalKeyring.create(root / "keyring.json")
        keys: dict[str, Any] = {"local": {"type": "local", "keyring": str(root / "keyring.json")}}
        if "hsm" in wanted or not args.no_reencrypt:
            keys["hsm"] = softhsm(root)
        if "kms" in wanted:
            import boto3

            url = stack.enter_context(moto(root))
            key_id = boto3.client("kms", endpoint_url=url).create_key()["KeyMetadata"]["KeyId"]
            keys["kms"] = {
                "type": "aws-kms",
                "key_id": key_id,
                "region": "us-east-1",
                "endpoint_url": url,
            }
        print(
            f"{args.count} secrets per run; 'on' = data-key caching and reuse (defaults), "
            "'off' = max_messages 1, cache_capacity 1"
        )
        for provider in wanted:
            results = {}
            for cached in (True, False):
                r = await one_run(root, keys, provider, args.count, cached)
                results[cached] = r
                print(
                    f"{provider:<6} {'on ' if cached else 'off'}: import {r['import_s']:7.2f} s "
                    f"({r['wraps']:>6} wraps)   cold start {r['load_s']:7.2f} s "
                    f"({r['unwraps']:>6} unwraps)"
                )
            on, off = results[True], results[False]
            print(
                f"{provider:<6} ratio off/on: unwraps "
                f"{off['unwraps'] / max(on['unwraps'], 1):.0f}x,"
                f" cold start time {off['load_s'] / max(on['load_s'], 1e-9):.1f}x"
            )
        if not args.no_reencrypt:
            r = await reencrypt_run(root, keys, args.count)
            print(
                f"reencrypt local -> hsm: {r['rewrapped']} versions in {r['seconds']:.2f} s "
                f"({r['rewrapped'] / max(r['seconds'], 1e-9):.0f}/s), {r['unwraps']} local "
                f"unwraps, {r['hsm_calls']} HSM calls"
            )
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
