"""Real servers for integration tests: etcd, moto_server, SoftHSM, PostgreSQL, Prometheus.

Every server binds only 127.0.0.1 on a free port, keeps its data under a
temporary directory, is waited for with a bounded timeout (the error carries
the tail of its log), and is stopped by its own pid: terminate, wait, kill.

``tests/conftest.py`` imports the fixtures with ``from tests.servers import *``.
A fixture whose binary is missing skips the test, unless ``CI`` is set: then
it fails, so CI can never pass by silently skipping. Standard library only.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, NoReturn

import pytest

__all__ = [
    "EtcdServer",
    "MotoServer",
    "PostgresServer",
    "PrometheusServer",
    "ServerProcess",
    "ServerStartError",
    "SoftHSMToken",
    "_etcd_process",
    "aws_env",
    "etcd_server",
    "find_softhsm_module",
    "free_port",
    "http_get",
    "moto_reset",
    "moto_server",
    "postgres_server",
    "prometheus_server",
    "require",
    "softhsm_token",
]

LOOPBACK = "127.0.0.1"
READY_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0
START_ATTEMPTS = 5
AWS_TEST_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}

# Ports handed out by this process, so two fixtures never pick the same one
# between probing it and the server binding it.
_handed_out: set[int] = set()
# Servers still running, stopped at interpreter exit if a teardown never ran.
_live: set[ServerProcess] = set()


class ServerStartError(RuntimeError):
    """A server exited or did not become ready in time; the message has its log tail."""


class _PortInUse(ServerStartError):
    """The server lost a race for its port; start again on fresh ports."""


def require(path: str | Path | None, what: str) -> str:
    """Return ``path`` if it is an executable file, else skip (or fail under CI).

    Args:
        path: the binary, or None when a search found nothing.
        what: what to install, for the message (e.g. "etcd (apt install etcd-server)").
    """
    if path is None or not (os.access(path, os.X_OK) and Path(path).is_file()):
        _missing(f"{what} not found ({path or 'not on PATH'}); run scripts/install-deps.sh")
    return str(path)


def _missing(reason: str) -> NoReturn:
    if os.environ.get("CI"):
        pytest.fail(f"CI is set, refusing to skip: {reason}", pytrace=False)
    pytest.skip(reason)


def free_port() -> int:
    """Return a loopback TCP port nobody listens on now and this process has not handed out."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind((LOOPBACK, 0))
            port: int = sock.getsockname()[1]
        if port not in _handed_out:
            _handed_out.add(port)
            return port
    raise RuntimeError("no free loopback port found")


def http_get(url: str, *, timeout: float = 2.0) -> tuple[int, bytes]:
    """GET ``url``; return (status, body) for any HTTP answer, raise OSError otherwise."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as err:
        with err:
            return err.code, err.read()


def _http_json(url: str, *, data: dict[str, Any] | None = None, timeout: float = 5.0) -> Any:
    body = None if data is None else json.dumps(data).encode()
    req = urllib.request.Request(url, data=body, method="GET" if body is None else "POST")
    req.add_header("Content-Type", "application/json")
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.loads(resp.read())


class ServerProcess:
    """One child server process with a log file, a readiness probe and a pid-based stop.

    Subclasses set ``name``, implement :meth:`_argv` and :meth:`_ready`, and
    may override :meth:`_pick_ports` (called before each fresh launch, never
    before a restart, so :meth:`start` after :meth:`stop` reuses the ports).
    """

    name = "server"
    ready_timeout = READY_TIMEOUT
    stop_signal = signal.SIGTERM

    def __init__(self, *, log_path: Path, env: dict[str, str] | None = None) -> None:
        self.log_path = log_path
        self.env = env
        self.user: int | None = None
        self.group: int | None = None
        self._proc: subprocess.Popen[bytes] | None = None

    def _argv(self) -> list[str]:
        raise NotImplementedError

    def _ready(self) -> bool:
        raise NotImplementedError

    def _pick_ports(self) -> None:
        """Choose fresh ports; the default server needs none."""

    @property
    def pid(self) -> int:
        """The server's own pid (not a wrapper's)."""
        if self._proc is None:
            raise RuntimeError(f"{self.name} is not running")
        return self._proc.pid

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def launch(self) -> None:
        """Start on fresh ports, retrying when another process won the race for one."""
        for attempt in range(START_ATTEMPTS):
            self._pick_ports()
            try:
                self.start()
            except _PortInUse:
                if attempt == START_ATTEMPTS - 1:
                    raise
            else:
                return

    def start(self) -> None:
        """Start the process on the current ports and wait until it is ready."""
        if self.running:
            raise RuntimeError(f"{self.name} is already running (pid {self.pid})")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            log.write(f"--- starting {self.name}: {' '.join(self._argv())}\n".encode())
            log.flush()
            self._proc = subprocess.Popen(
                self._argv(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env,
                user=self.user,
                group=self.group,
                extra_groups=[] if self.user is not None else None,
                # Own session: a test signalling its process group never hits us.
                start_new_session=True,
            )
        _live.add(self)
        self._wait_ready()

    def _wait_ready(self) -> None:
        assert self._proc is not None
        deadline = time.monotonic() + self.ready_timeout
        while time.monotonic() < deadline:
            code = self._proc.poll()
            if code is not None:
                self._proc = None
                _live.discard(self)
                tail = self.log_tail()
                error = _PortInUse if "address already in use" in tail.lower() else ServerStartError
                raise error(f"{self.name} exited with status {code} during start-up:\n{tail}")
            with contextlib.suppress(OSError, ValueError, subprocess.SubprocessError):
                if self._ready():
                    return
            time.sleep(0.1)
        self.stop()
        raise ServerStartError(
            f"{self.name} not ready after {self.ready_timeout:.0f}s:\n{self.log_tail()}"
        )

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """Signal the process by pid, wait up to ``timeout`` seconds, then kill it."""
        proc, self._proc = self._proc, None
        _live.discard(self)
        if proc is None:
            return
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(self.stop_signal)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout)

    def log_tail(self, size: int = 4000) -> str:
        """The last ``size`` bytes of the server's log, for error messages."""
        try:
            with open(self.log_path, "rb") as log:
                log.seek(0, os.SEEK_END)
                log.seek(max(0, log.tell() - size))
                return log.read().decode(errors="replace")
        except OSError as err:
            return f"(no log: {err})"


@atexit.register
def _stop_leftovers() -> None:
    for server in list(_live):
        server.stop(timeout=3)


# --- etcd ---------------------------------------------------------------------------------


class EtcdServer(ServerProcess):
    """A single-member etcd 3.4 on loopback; ``stop()``/``start()`` keep ports and data."""

    name = "etcd"

    def __init__(self, *, binary: str, data_dir: Path, log_path: Path) -> None:
        # Flags only: an ETCD_* variable from the caller's environment would be read too.
        env = {k: v for k, v in os.environ.items() if not k.startswith("ETCD_")}
        machine = os.uname().machine
        if machine not in ("x86_64", "amd64"):
            # etcd 3.4 refuses to start on arm64 and others unless told the arch is known.
            env["ETCD_UNSUPPORTED_ARCH"] = {"aarch64": "arm64"}.get(machine, machine)
        super().__init__(log_path=log_path, env=env)
        self.binary = binary
        self.data_dir = data_dir
        self.port = 0
        self.peer_port = 0

    @property
    def endpoint(self) -> str:
        """``127.0.0.1:PORT``, the form the agent's etcd store config takes."""
        return f"{LOOPBACK}:{self.port}"

    @property
    def client_url(self) -> str:
        return f"http://{self.endpoint}"

    def _pick_ports(self) -> None:
        self.port, self.peer_port = free_port(), free_port()

    def _argv(self) -> list[str]:
        peer_url = f"http://{LOOPBACK}:{self.peer_port}"
        return [
            self.binary,
            "--name=test",
            f"--data-dir={self.data_dir}",
            f"--listen-client-urls={self.client_url}",
            f"--advertise-client-urls={self.client_url}",
            f"--listen-peer-urls={peer_url}",
            f"--initial-advertise-peer-urls={peer_url}",
            f"--initial-cluster=test={peer_url}",
            "--initial-cluster-state=new",
            "--logger=zap",
            "--log-outputs=stderr",
            "--log-level=warn",
        ]

    def _ready(self) -> bool:
        status, body = http_get(f"{self.client_url}/health")
        return status == 200 and json.loads(body).get("health") == "true"


@pytest.fixture(scope="session")
def _etcd_process(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdServer]:
    binary = require(shutil.which("etcd") or "/usr/bin/etcd", "etcd (apt install etcd-server)")
    root = tmp_path_factory.mktemp("etcd")
    server = EtcdServer(binary=binary, data_dir=root / "data", log_path=root / "etcd.log")
    server.launch()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def etcd_server(_etcd_process: EtcdServer) -> EtcdServer:
    """A running etcd, shared by the session; tests may ``stop()`` and ``start()`` it.

    A test that left it stopped, or whose restart timed out on a loaded
    machine, would fail every later etcd test; so each test gets it running:
    restarted on its port and data, or on fresh ports if that port was taken.
    """
    server = _etcd_process
    if not server.running:
        try:
            server.start()
        except ServerStartError:
            server.launch()
    return server


# --- moto_server --------------------------------------------------------------------------


class MotoServer(ServerProcess):
    """moto's standalone AWS mock (Secrets Manager, KMS, S3, ...) on loopback."""

    name = "moto_server"

    def __init__(self, *, binary: str, log_path: Path) -> None:
        super().__init__(log_path=log_path, env={**os.environ, **AWS_TEST_ENV})
        self.binary = binary
        self.port = 0

    @property
    def endpoint_url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    def _pick_ports(self) -> None:
        self.port = free_port()

    def _argv(self) -> list[str]:
        return [self.binary, "-H", LOOPBACK, "-p", str(self.port)]

    def _ready(self) -> bool:
        status, _ = http_get(f"{self.endpoint_url}/moto-api/")
        return status < 500


def moto_reset(endpoint_url: str) -> None:
    """Forget every resource in a running moto_server (between tests)."""
    req = urllib.request.Request(f"{endpoint_url}/moto-api/reset", data=b"", method="POST")
    with urllib.request.urlopen(req, timeout=10) as resp:
        resp.read()


@pytest.fixture(scope="session")
def aws_env() -> Iterator[dict[str, str]]:
    """Fake AWS credentials and region in ``os.environ`` for the session, restored after."""
    with pytest.MonkeyPatch.context() as mp:
        for key, value in AWS_TEST_ENV.items():
            mp.setenv(key, value)
        # A developer's real profile or config must never be picked up.
        for key in ("AWS_PROFILE", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE"):
            mp.delenv(key, raising=False)
        mp.setenv("AWS_CONFIG_FILE", os.devnull)
        mp.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
        yield dict(AWS_TEST_ENV)


@pytest.fixture(scope="session")
def moto_server(
    tmp_path_factory: pytest.TempPathFactory, aws_env: dict[str, str]
) -> Iterator[MotoServer]:
    """A running moto_server; requesting it also sets the fake AWS credentials."""
    candidate = Path(sys.executable).parent / "moto_server"
    found = str(candidate) if candidate.exists() else shutil.which("moto_server")
    binary = require(found, "moto_server (pip install 'moto[server]')")
    server = MotoServer(binary=binary, log_path=tmp_path_factory.mktemp("moto") / "moto.log")
    server.launch()
    try:
        yield server
    finally:
        server.stop()


# --- SoftHSM ------------------------------------------------------------------------------


class SoftHSMToken:
    """An initialised SoftHSM token in a private token directory."""

    def __init__(self, *, module: str, conf_path: Path, token_label: str, pin: str, so_pin: str):
        self.module = module
        self.conf_path = conf_path
        self.token_label = token_label
        self.pin = pin
        self.so_pin = so_pin

    def __repr__(self) -> str:
        return f"SoftHSMToken(module={self.module!r}, token_label={self.token_label!r})"


def find_softhsm_module() -> str | None:
    """Path of libsofthsm2.so, preferring the path the docs use."""
    candidates = [Path("/usr/lib/softhsm/libsofthsm2.so")]
    candidates += sorted(Path("/usr/lib").glob("*/softhsm/libsofthsm2.so"))
    candidates += [Path("/usr/local/lib/softhsm/libsofthsm2.so")]
    return next((str(c) for c in candidates if c.is_file()), None)


def _init_softhsm_token(util: str, token: SoftHSMToken) -> None:
    argv = [util, "--init-token", "--free", "--label", token.token_label]
    argv += ["--pin", token.pin, "--so-pin", token.so_pin]
    env = {**os.environ, "SOFTHSM2_CONF": str(token.conf_path)}
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=30, check=False)
    if proc.returncode != 0:
        raise ServerStartError(f"softhsm2-util --init-token failed:\n{proc.stdout}{proc.stderr}")


def _check_softhsm_token(token: SoftHSMToken) -> None:
    """Open the token through python-pkcs11 when it is installed (it is in the pkcs11 extra)."""
    try:
        import pkcs11
    except ImportError:
        return
    lib = pkcs11.lib(token.module)
    with lib.get_token(token_label=token.token_label).open(user_pin=token.pin):
        pass


@pytest.fixture(scope="session")
def softhsm_token(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SoftHSMToken]:
    """A fresh SoftHSM token; ``SOFTHSM2_CONF`` points at it for the session.

    SoftHSM reads ``SOFTHSM2_CONF`` once, when the library is first
    initialised in a process, so every PKCS#11 user in the test session sees
    this token directory.
    """
    util = require(shutil.which("softhsm2-util"), "softhsm2-util (apt install softhsm2)")
    module = find_softhsm_module()
    if module is None:
        _missing("libsofthsm2.so not found; run scripts/install-deps.sh")
    root = tmp_path_factory.mktemp("softhsm")
    (root / "tokens").mkdir()
    conf = root / "softhsm2.conf"
    conf.write_text(
        f"directories.tokendir = {root / 'tokens'}\n"
        "objectstore.backend = file\n"
        "log.level = ERROR\n"
        "slots.removable = false\n"
    )
    token = SoftHSMToken(
        module=module,
        conf_path=conf,
        token_label="secrets-agent-test",
        pin="1234-test-pin",
        so_pin="5678-test-so-pin",
    )
    _init_softhsm_token(util, token)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SOFTHSM2_CONF", str(conf))
        _check_softhsm_token(token)
        yield token


# --- PostgreSQL ---------------------------------------------------------------------------


def _postgres_bindir() -> Path | None:
    """The newest ``/usr/lib/postgresql/<ver>/bin`` holding a postgres binary."""
    found = [p.parent for p in Path("/usr/lib/postgresql").glob("*/bin/postgres")]
    found.sort(key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0)
    return found[-1] if found else None


class PostgresServer(ServerProcess):
    """A throwaway PostgreSQL cluster on loopback with a password-protected superuser."""

    name = "postgres"
    # SIGINT is "fast shutdown": it does not wait for clients to disconnect.
    stop_signal = signal.SIGINT

    def __init__(self, *, bindir: Path, root: Path, log_path: Path) -> None:
        super().__init__(log_path=log_path, env={"PATH": os.defpath, "LC_ALL": "C.UTF-8"})
        self.bindir = bindir
        self.root = root
        self.data_dir = root / "data"
        self.socket_dir = root / "sock"
        self.host = LOOPBACK
        self.port = 0
        self.admin_user = "postgres"
        self.admin_password = secrets.token_urlsafe(16)
        self.dbname = "postgres"

    @property
    def dsn(self) -> str:
        """``postgresql://user:password@127.0.0.1:PORT/postgres`` for the superuser."""
        password = urllib.parse.quote(self.admin_password, safe="")
        return f"postgresql://{self.admin_user}:{password}@{self.host}:{self.port}/{self.dbname}"

    def _pick_ports(self) -> None:
        self.port = free_port()

    def _argv(self) -> list[str]:
        return [
            str(self.bindir / "postgres"),
            "-D", str(self.data_dir),
            "-p", str(self.port),
            "-k", str(self.socket_dir),
            "-c", f"listen_addresses={LOOPBACK}",
            # Throwaway data: trade durability for speed.
            "-c", "fsync=off",
            "-c", "synchronous_commit=off",
            "-c", "full_page_writes=off",
        ]  # fmt: skip

    def _ready(self) -> bool:
        argv = [str(self.bindir / "pg_isready"), "-q", "-h", LOOPBACK, "-p", str(self.port)]
        return subprocess.run(argv, timeout=5, check=False).returncode == 0

    def initdb(self) -> None:
        """Create the cluster: scram-sha-256 on TCP, trust only on the private socket dir."""
        pwfile = self.root / "pwfile"
        pwfile.write_text(self.admin_password + "\n")
        self._chown(pwfile)
        self.socket_dir.mkdir(mode=0o700)
        self._chown(self.socket_dir)
        argv = [str(self.bindir / "initdb"), "-D", str(self.data_dir), "-U", self.admin_user]
        argv += ["--pwfile", str(pwfile), "--auth-host=scram-sha-256", "--auth-local=trust"]
        argv += ["-E", "UTF8", "--no-sync", "--no-instructions"]
        proc = subprocess.run(
            argv, env=self.env, user=self.user, group=self.group,
            extra_groups=[] if self.user is not None else None,
            capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip
        pwfile.unlink()
        if proc.returncode != 0:
            raise ServerStartError(f"initdb failed:\n{proc.stdout}{proc.stderr}")

    def _chown(self, path: Path) -> None:
        if self.user is not None:
            os.chown(path, self.user, self.group if self.group is not None else -1)

    def psql(self, sql: str, *, dbname: str | None = None) -> str:
        """Run ``sql`` with psql over TCP as the superuser; return its unaligned output."""
        argv = [str(self.bindir / "psql"), "-X", "-A", "-t", "-v", "ON_ERROR_STOP=1"]
        argv += ["-h", self.host, "-p", str(self.port), "-U", self.admin_user]
        argv += ["-d", dbname or self.dbname, "-c", sql]
        env = {**(self.env or {}), "PGPASSWORD": self.admin_password}
        proc = subprocess.run(
            argv, env=env, capture_output=True, text=True, timeout=30, check=False
        )
        if proc.returncode != 0:
            raise RuntimeError(f"psql failed ({proc.returncode}): {proc.stderr.strip()}")
        return proc.stdout


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """A running PostgreSQL; connect with ``.dsn``, or host, port, admin_user, admin_password."""
    bindir = _postgres_bindir()
    require(bindir / "postgres" if bindir else None, "PostgreSQL (apt install postgresql)")
    assert bindir is not None
    # The postgres user cannot reach pytest's tmp dir under /tmp/pytest-of-root
    # (0700), so the cluster lives in its own directory under /tmp.
    root = Path(tempfile.mkdtemp(prefix="sa-pg-"))
    server = PostgresServer(bindir=bindir, root=root, log_path=root / "postgres.log")
    if os.geteuid() == 0:
        # postgres refuses to run as root.
        try:
            entry = pwd.getpwnam("postgres")
        except KeyError:
            _missing("running as root but there is no 'postgres' user to run PostgreSQL as")
        server.user, server.group = entry.pw_uid, entry.pw_gid
        os.chown(root, entry.pw_uid, entry.pw_gid)
    try:
        server.initdb()
        server.launch()
        yield server
    finally:
        server.stop()
        shutil.rmtree(root, ignore_errors=True)


# --- Prometheus ---------------------------------------------------------------------------


class PrometheusServer(ServerProcess):
    """Prometheus scraping the given loopback targets every second."""

    name = "prometheus"

    def __init__(
        self,
        *,
        binary: str,
        root: Path,
        targets: Sequence[str],
        rule_files: Sequence[Path] = (),
        job: str = "test",
    ) -> None:
        super().__init__(log_path=root / "prometheus.log")
        self.binary = binary
        self.root = root
        self.targets = list(targets)
        self.port = 0
        self.config_path = root / "prometheus.yml"
        self.config_path.write_text(
            "global:\n"
            "  scrape_interval: 1s\n"
            "  evaluation_interval: 1s\n"
            f"rule_files: {json.dumps([str(p) for p in rule_files])}\n"
            "scrape_configs:\n"
            f"  - job_name: {job}\n"
            "    scrape_timeout: 1s\n"
            "    static_configs:\n"
            f"      - targets: {json.dumps(self.targets)}\n"
        )

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    def _pick_ports(self) -> None:
        self.port = free_port()

    def _argv(self) -> list[str]:
        return [
            self.binary,
            f"--config.file={self.config_path}",
            f"--storage.tsdb.path={self.root / 'data'}",
            f"--web.listen-address={LOOPBACK}:{self.port}",
            "--log.level=warn",
        ]

    def _ready(self) -> bool:
        status, _ = http_get(f"{self.url}/-/ready")
        return status == 200

    def query(self, expr: str) -> list[dict[str, Any]]:
        """Evaluate an instant PromQL query; return ``data.result``."""
        url = f"{self.url}/api/v1/query?{urllib.parse.urlencode({'query': expr})}"
        answer = _http_json(url)
        if answer.get("status") != "success":
            raise RuntimeError(f"query {expr!r} failed: {answer}")
        result: list[dict[str, Any]] = answer["data"]["result"]
        return result

    def targets_health(self) -> dict[str, str]:
        """Map each scrape target (``host:port``) to its health: up, down or unknown."""
        answer = _http_json(f"{self.url}/api/v1/targets?state=active")
        return {t["labels"]["instance"]: t["health"] for t in answer["data"]["activeTargets"]}

    def wait_for_target_up(self, timeout: float = 15.0) -> None:
        """Wait until every target has been scraped successfully at least once."""
        deadline = time.monotonic() + timeout
        health: dict[str, str] = {}
        while time.monotonic() < deadline:
            health = self.targets_health()
            if health and all(h == "up" for h in health.values()):
                return
            time.sleep(0.2)
        raise TimeoutError(f"targets not up after {timeout}s: {health}\n{self.log_tail()}")


@pytest.fixture
def prometheus_server(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Callable[[Sequence[str]], PrometheusServer]]:
    """Factory: ``prometheus_server(["127.0.0.1:PORT"])`` starts one; all stop after the test."""
    binary = require(shutil.which("prometheus") or "/usr/bin/prometheus", "prometheus")
    started: list[PrometheusServer] = []

    def start(targets: Sequence[str], **options: Any) -> PrometheusServer:
        """``options``: ``rule_files`` (paths of rule files to load), ``job`` (the job name)."""
        server = PrometheusServer(
            binary=binary, root=tmp_path_factory.mktemp("prometheus"), targets=targets, **options
        )
        server.launch()
        started.append(server)
        return server

    try:
        yield start
    finally:
        for server in started:
            server.stop()
