"""The container image's command line, without Docker: uid 10001, read-only config.

The Dockerfile runs ``secrets-agent run`` (and, in a Job, ``render --once``) as
uid 10001 with ``XDG_RUNTIME_DIR=/run``, ``HOME=/nonexistent`` and the config
directory mounted read-only, and the config is the one ``init`` writes. No Docker
engine runs in CI, so this runs the same command lines from the venv, as uid
10001 (setpriv), on a config directory that uid cannot write, with a tmpfs
directory standing in for the image's /run.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from agent.cli import main

pytestmark = pytest.mark.root

UID = 10001
BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def image_like() -> Iterator[tuple[Path, Path, dict[str, str]]]:
    """(config dir, runtime dir, environment) laid out as in the image."""
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root and setpriv to run as uid 10001")
    conf = Path(tempfile.mkdtemp(prefix="sa-ctr-conf-"))
    run = Path(tempfile.mkdtemp(prefix="sa-ctr-run-", dir="/dev/shm"))
    try:
        assert main(["init", "--dir", str(conf)]) == 0
        cfg = conf / "agent.yaml"
        doc = yaml.safe_load(cfg.read_text())
        doc["templates"] = [
            {"name": "db", "secret": "app/db", "destination": str(run / "files" / "db")}
        ]
        cfg.write_text(yaml.safe_dump(doc))
        os.environ["SECRETS_AGENT_CONFIG"] = str(cfg)
        code = subprocess.run(
            [str(BIN / "secrets-agent"), "put", "app/db"],
            input=b"container-value",
            env={**os.environ, "SECRETS_AGENT_CONFIG": str(cfg)},
            capture_output=True,
            timeout=60,
        ).returncode
        assert code == 0
        # What a read-only mount gives the agent: files it can read, a directory
        # it cannot write. The keyring is private to the agent's uid.
        for path in [conf / "keyring.json", conf / "store", *(conf / "store").rglob("*")]:
            os.chown(path, UID, UID)
        os.chmod(conf, 0o755)
        os.chmod(cfg, 0o644)
        os.chown(run, UID, UID)
        os.chmod(run, 0o755)
        (run / "files").mkdir(mode=0o700)
        os.chown(run / "files", UID, UID)
        env = {
            "PATH": f"{BIN}:/usr/bin:/bin",
            "HOME": "/nonexistent",
            "XDG_RUNTIME_DIR": str(run),
            "SECRETS_AGENT_CONFIG": str(cfg),
            "PYTHONDONTWRITEBYTECODE": "1",
        }
        yield conf, run, env
    finally:
        os.environ.pop("SECRETS_AGENT_CONFIG", None)
        shutil.rmtree(conf, ignore_errors=True)
        shutil.rmtree(run, ignore_errors=True)


Layout = tuple[Path, Path, dict[str, str]]


def _as_agent(*argv: str) -> list[str]:
    return ["setpriv", f"--reuid={UID}", f"--regid={UID}", "--clear-groups", "--", *argv]


def test_the_config_dir_is_read_only_to_the_agent(image_like: Layout) -> None:
    conf, _, env = image_like
    proc = subprocess.run(
        _as_agent("touch", str(conf / "probe")), env=env, capture_output=True, timeout=30
    )
    assert proc.returncode != 0


def test_render_once_as_an_init_container(image_like: Layout) -> None:
    conf, run, env = image_like
    before = sorted(p.name for p in conf.iterdir())
    proc = subprocess.run(
        _as_agent("secrets-agent", "render", "--once"),
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        cwd="/",
    )
    assert proc.returncode == 0, proc.stderr
    assert (run / "files" / "db").read_bytes() == b"container-value"
    assert (run / "files" / "db").stat().st_uid == UID
    assert sorted(p.name for p in conf.iterdir()) == before


def test_run_serves_and_becomes_ready_as_uid_10001(image_like: Layout) -> None:
    conf, run, env = image_like
    before = sorted(p.name for p in conf.iterdir())
    agent = subprocess.Popen(
        _as_agent("secrets-agent", "run"),
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd="/",
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 60
        ready = None
        while time.monotonic() < deadline and agent.poll() is None:
            ready = subprocess.run(
                _as_agent("secrets-agent", "health", "--ready"),
                env=env,
                capture_output=True,
                text=True,
                timeout=30,
                cwd="/",
            )
            if ready.returncode == 0:
                break
            time.sleep(0.3)
        assert agent.poll() is None, agent.communicate(timeout=10)[1].decode()
        assert ready is not None and ready.returncode == 0, ready and ready.stderr
        # the default socket of the image: $XDG_RUNTIME_DIR/secrets-agent/agent.sock
        sock = run / "secrets-agent" / "agent.sock"
        assert sock.is_socket() and sock.stat().st_uid == UID
        assert (run / "files" / "db").read_bytes() == b"container-value"
        assert sorted(p.name for p in conf.iterdir()) == before
    finally:
        agent.terminate()
        try:
            _, err = agent.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            agent.kill()
            agent.communicate()
            raise
    assert agent.returncode == 0, err.decode()


def _run_fails(env: dict[str, str], *argv: str) -> str:
    proc = subprocess.run(
        _as_agent("secrets-agent", *argv), env=env, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    return proc.stderr


def test_a_root_owned_tmpfs_for_the_socket_is_named_with_owner_mode_and_fix(
    image_like: Layout,
) -> None:
    """`docker run --tmpfs /run/secrets-agent:mode=0711` without uid=: the mount is root's."""
    _, run, env = image_like
    sock_dir = run / "secrets-agent"
    sock_dir.mkdir(mode=0o711)
    sock_dir.chmod(0o711)
    err = _run_fails(env, "run")
    assert f"cannot create the socket {sock_dir / 'agent.sock'}: Permission denied" in err
    assert f"{sock_dir} (owner root uid 0, mode 0711)" in err
    assert f"(uid {UID} gid {UID})" in err
    assert f"Fix: chown {UID}:{UID} {sock_dir}" in err
    assert "listen.socket" in err


def test_an_audit_log_on_the_read_only_config_mount_is_named_with_owner_mode_and_fix(
    image_like: Layout,
) -> None:
    """An older config (audit.path: ./audit.log) on the read-only /etc/secrets-agent mount."""
    conf, _, env = image_like
    cfg = conf / "agent.yaml"
    doc = yaml.safe_load(cfg.read_text())
    doc["audit"] = {"path": "./audit.log"}
    cfg.write_text(yaml.safe_dump(doc))
    err = _run_fails(env, "run")
    assert f"cannot open audit log {conf / 'audit.log'} for appending: Permission denied" in err
    assert f"{conf} (owner root uid 0, mode 0755)" in err
    assert f"Fix: chown {UID}:{UID} {conf}" in err
    assert 'audit.path "-"' in err


def test_an_unreadable_keyring_is_named_with_owner_mode_and_fix(image_like: Layout) -> None:
    conf, _, env = image_like
    os.chown(conf / "keyring.json", 0, 0)
    proc = subprocess.run(
        _as_agent("secrets-agent", "get", "app/db"),
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        cwd="/",
    )
    assert proc.returncode != 0
    assert f"{conf / 'keyring.json'} (owner root uid 0, mode 0600)" in proc.stderr
    assert f"read it. Fix: chown {UID}:{UID} {conf / 'keyring.json'}" in proc.stderr


def test_a_put_into_a_root_owned_store_names_the_directory_and_the_fix(image_like: Layout) -> None:
    """A store on the read-only config mount is fine to serve from, not to write."""
    conf, _, env = image_like
    store = conf / "store"
    for path in [store, *store.rglob("*")]:
        os.chown(path, 0, 0)
        os.chmod(path, 0o755 if path.is_dir() else 0o644)
    assert (
        subprocess.run(
            _as_agent("secrets-agent", "get", "app/db"), env=env, capture_output=True, timeout=60
        ).stdout
        == b"container-value"
    )
    proc = subprocess.run(
        _as_agent("secrets-agent", "put", "app/db", "--value", "new"),
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        cwd="/",
    )
    assert proc.returncode == 1
    versions = store / "secrets" / "app" / "db" / "versions"
    assert f"{versions} (owner root uid 0, mode 0755) does not let the agent" in proc.stderr
    assert f"Fix: chown -R {UID}:{UID} {store}" in proc.stderr


def test_an_unreadable_config_and_a_keyring_write_in_the_read_only_dir_name_owner_mode_fix(
    image_like: Layout,
) -> None:
    conf, _, env = image_like
    cfg = conf / "agent.yaml"
    cfg.chmod(0o600)  # root's: the agent's uid may not read it
    err = _run_fails(env, "check-config")
    assert f"cannot read config '{cfg}': Permission denied: " in err
    assert f"{cfg} (owner root uid 0, mode 0600) does not let the agent" in err
    assert f"Fix: chown {UID}:{UID} {cfg}" in err
    cfg.chmod(0o644)
    doc = yaml.safe_load(cfg.read_text())
    doc["keys"]["local"]["keyring"] = "./new-keyring.json"
    cfg.write_text(yaml.safe_dump(doc))
    proc = subprocess.run(
        _as_agent("secrets-agent", "keys", "create"),
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        cwd="/",
    )
    assert proc.returncode == 1
    assert f"{conf} (owner root uid 0, mode 0755) does not let the agent" in proc.stderr
    assert f"write in it. Fix: chown {UID}:{UID} {conf}" in proc.stderr


APP = """
import json, socket, sys, http.client
sock_path, file_path, name = sys.argv[1:4]
class Conn(http.client.HTTPConnection):
    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.connect(sock_path)
value = open(file_path).read()
c = Conn("localhost"); c.request("GET", "/v1/secrets/" + name)
print(len(value), json.load(c.getresponse())["value"] == value)
"""


def test_the_kubernetes_sidecar_layout_as_uid_10001_with_the_pods_fs_group() -> None:
    """examples/kubernetes/deployment.yaml's config on emptyDirs as a kubelet makes them.

    emptyDirs are root-owned, mode 0777, setgid to the pod's fsGroup (10002);
    the agent runs as 10001 with 10002 as a supplementary group, the app as
    10002. Only the store and key provider are swapped for a directory and a
    keyring (no etcd or KMS in this test), and the paths moved under a temp dir.
    """
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root and setpriv to run as uid 10001")
    python = "/usr/bin/python3"
    if not os.access(python, os.X_OK):
        pytest.skip("no system python for the app's uid")
    docs = yaml.safe_load_all((ROOT / "examples" / "kubernetes" / "deployment.yaml").read_text())
    config_map = next(d for d in docs if d and d["kind"] == "ConfigMap")
    cfg = yaml.safe_load(config_map["data"]["agent.yaml"])
    pod = Path(tempfile.mkdtemp(prefix="sa-pod-", dir="/dev/shm"))
    state = Path(tempfile.mkdtemp(prefix="sa-pod-state-"))
    agent = None
    try:
        os.chmod(pod, 0o755)
        for volume in ("run/secrets-agent", "run/secrets"):
            (pod / volume).mkdir(parents=True)
            os.chown(pod / volume, 0, 10002)
            os.chmod(pod / volume, 0o2777)
            os.chmod((pod / volume).parent, 0o755)
        assert main(["init", "--dir", str(state)]) == 0
        (state / "agent.yaml").unlink()
        cfg["keys"] = {"local": {"type": "local", "keyring": str(state / "keyring.json")}}
        cfg["write_keys"] = ["local"]
        cfg["store"] = {"type": "file", "path": str(state / "store")}
        cfg["metrics"] = {"listen": None}
        cfg["listen"]["socket"] = f"{pod}{cfg['listen']['socket']}"
        for t in cfg["templates"]:
            t["destination"] = f"{pod}{t['destination']}"
        cfg["render"]["shared_volumes"] = [f"{pod}{v}" for v in cfg["render"]["shared_volumes"]]
        path = state / "agent.yaml"
        path.write_text(yaml.safe_dump(cfg))
        assert main(["-c", str(path), "put", "--value", "pod-value", "app/db-password"]) == 0
        for p in [state / "keyring.json", state / "store", *(state / "store").rglob("*")]:
            os.chown(p, UID, UID)
        os.chmod(state, 0o755)
        os.chmod(path, 0o644)
        env = {"PATH": f"{BIN}:/usr/bin:/bin", "HOME": "/nonexistent", "XDG_RUNTIME_DIR": "/run"}
        env["SECRETS_AGENT_CONFIG"] = str(path)
        as_agent = ["setpriv", f"--reuid={UID}", f"--regid={UID}", "--groups=10002", "--"]
        agent = subprocess.Popen(
            [*as_agent, "secrets-agent", "run"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            cwd="/",
            start_new_session=True,
        )
        ready = subprocess.run(
            [*as_agent, "secrets-agent", "health", "--ready", "--wait", "60s"],
            env=env,
            capture_output=True,
            text=True,
            timeout=90,
            cwd="/",
        )
        assert ready.returncode == 0, (ready.stderr, agent.poll())
        as_app = ["setpriv", "--reuid=10002", "--regid=10002", "--groups=10002", "--"]
        socket_path, file_path = cfg["listen"]["socket"], cfg["templates"][0]["destination"]
        app = subprocess.run(
            [*as_app, python, "-c", APP, socket_path, file_path, "app/db-password"],
            env={"PATH": "/usr/bin:/bin"},
            capture_output=True,
            text=True,
            timeout=60,
            cwd="/",
        )
        assert app.returncode == 0, app.stderr
        assert app.stdout.split() == ["9", "True"]
        status = subprocess.run(
            [*as_agent, "secrets-agent", "status"],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            cwd="/",
        )
        assert status.returncode == 0 and "app/db-password" in status.stdout, status.stderr
        sock_dir = Path(cfg["listen"]["socket"]).parent
        st = sock_dir.stat()
        assert (st.st_uid, st.st_mode & 0o7777) == (UID, 0o711)
    finally:
        if agent is not None:
            agent.terminate()
            try:
                agent.communicate(timeout=20)
            except subprocess.TimeoutExpired:
                agent.kill()
                agent.communicate()
        shutil.rmtree(pod, ignore_errors=True)
        shutil.rmtree(state, ignore_errors=True)
