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
