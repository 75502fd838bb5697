"""Black-box repros of issue 11 findings 2, 3 and 5 against the agent in a checkout.

Not a test module: it runs ``python -m agent`` from REPO, so it works against
code older than the regression tests' APIs (docs/reliability.md, "Checked
against the code before the fixes"):

    git worktree add /tmp/old 5da7e07^
    .venv/bin/python tests/reliability/findings_repro.py /tmp/old finding2 finding3
    .venv/bin/python tests/reliability/findings_repro.py . finding2 finding3

It starts servers on a Unix socket and 127.0.0.1 only and stops them by pid.
"""

import os
import resource
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

READ_HEAD = [b""]
REPO = Path(sys.argv[1])
PY = sys.executable


def cli(d, *args, stdin=None):
    return subprocess.run(
        [PY, "-m", "agent", "-c", str(d / "agent.yaml"), *args],
        cwd=REPO,
        input=stdin,
        capture_output=True,
        timeout=60,
    )


def setup(extra=None):
    d = Path(tempfile.mkdtemp(prefix="find-"))
    subprocess.run(
        [PY, "-m", "agent", "init", "--dir", str(d)], cwd=REPO, capture_output=True, check=True
    )
    doc = yaml.safe_load((d / "agent.yaml").read_text())
    doc["listen"] = {**(doc.get("listen") or {}), "socket": str(d / "agent.sock")}
    doc["audit"] = {"path": str(d / "audit.log")}
    doc["refresh"] = {"interval": "1s"}
    doc.update(extra or {})
    (d / "agent.yaml").write_text(yaml.safe_dump(doc))
    assert cli(d, "put", "app/db", stdin=b"value-1").returncode == 0
    return d


def start(d, preexec=None):
    with open(d / "agent.log", "wb") as log:
        p = subprocess.Popen(
            [PY, "-m", "agent", "-c", str(d / "agent.yaml"), "run"],
            cwd=REPO,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=preexec,
        )
    for _ in range(200):
        if read(d, timeout=1)[0] == 200:
            break
        time.sleep(0.05)
    return p


def read(d, path="/v1/secrets/app/db?format=raw", timeout=2.0):
    try:
        s = socket.socket(socket.AF_UNIX)
        s.settimeout(timeout)
        s.connect(str(d / "agent.sock"))
        s.sendall(f"GET {path} HTTP/1.0\r\nHost: x\r\n\r\n".encode())
        data = b""
        while c := s.recv(65536):
            data += c
        s.close()
        head, _, body = data.partition(b"\r\n\r\n")
        READ_HEAD[0] = head
        return int(head.split()[1]), body
    except OSError as e:
        return None, repr(e).encode()


def stop(p):
    if p.poll() is None:
        os.kill(p.pid, signal.SIGTERM)
        try:
            p.wait(20)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def finding2():
    d = setup()
    p = start(d)
    stages = next((d / "store").rglob("stages.json"))
    stages.write_text("[" * 200_000 + "]" * 200_000)
    time.sleep(4)
    alive = p.poll() is None
    st = read(d)
    stop(p)
    print(f"finding 2 (200k-deep stages.json): agent alive={alive}, read={st[0]}")


def finding3():
    d = setup({"metrics": {"listen": "127.0.0.1:19464"}})
    p = start(d, preexec=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (1024, 1024)))
    socks = []
    for _ in range(1100):
        try:
            s = socket.create_connection(("127.0.0.1", 19464), timeout=2)
            socks.append(s)
        except OSError:
            break
    time.sleep(1)
    lat = []
    for _ in range(20):
        t = time.perf_counter()
        st, _ = read(d, timeout=3)
        lat.append((st, time.perf_counter() - t))
    ok = sum(1 for s, _ in lat if s == 200)
    for s in socks:
        s.close()
    stop(p)
    size = (d / "agent.log").stat().st_size
    print(
        f"finding 3 (1,100 idle TCP conns, ulimit 1024): {len(socks)} opened, "
        f"unix reads ok {ok}/20, "
        f"max {max(x for _, x in lat) * 1000:.0f} ms, log {size} bytes"
    )


def finding5():
    d = setup({"refresh": {}})
    p = start(d)
    (d / "store").rename(d / "store.away")
    time.sleep(3)
    st = read(d)
    stale = b"x-secret-stale: true" in READ_HEAD[0].lower()
    text = (d / "agent.log").read_text()
    print("  stale-marked during outage:", stale)
    (d / "store.away").rename(d / "store")
    time.sleep(3)
    text2 = (d / "agent.log").read_text()
    stop(p)
    print(
        f"finding 5 (store moved away): read={st[0]}, "
        f"'unavailable' logged={'unavailable' in text.lower()}, "
        f"recovery logged={'available again' in text2}"
    )


for f in sys.argv[2:]:
    globals()[f]()
