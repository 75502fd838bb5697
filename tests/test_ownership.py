"""Directories another local user could swap things in are refused (issue 12, findings 1 and 2).

Run as root with a second real uid (``nobody``) playing the local attacker: it
squats a render directory and a socket directory before the agent starts.
Every refusal names the path, its owner and mode, and the fix. Writes are
relative to checked directory descriptors: a generation directory swapped
for a symlink during 200 rotations never redirects a write.
"""

from __future__ import annotations

import os
import shutil
import socket
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent import fsutil
from agent.audit import AuditLog
from agent.errors import BackendUnavailable, ConfigError
from agent.render import writer
from agent.render.formats import RenderError
from agent.render.writer import Owner
from agent.sockets import prepare_socket_path
from agent.stores.file import FileStore
from tests.server.test_other_uid import NOBODY, _runs_as_nobody

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as another uid"),
]

ROTATIONS = 200

SWAPPER = """
import os, sys, time
squat, outside, stop = sys.argv[1:4]
swaps = 0
deadline = time.monotonic() + 60
while not os.path.exists(stop) and time.monotonic() < deadline:
    try:
        names = os.listdir(squat)
    except OSError:
        continue
    for name in names:
        if name.startswith("..") and not name.endswith(".moved"):
            path = os.path.join(squat, name)
            try:
                os.rename(path, path + ".moved")
                os.symlink(outside, path)
                swaps += 1
            except OSError:
                pass
    if not os.path.lexists(os.path.join(squat, "..data")):
        try:
            os.symlink(outside, os.path.join(squat, "..data"))
        except OSError:
            pass
print(swaps)
"""


@pytest.fixture(scope="module")
def nobody_python() -> str:
    """A Python interpreter the nobody user may execute."""
    for candidate in ("/usr/bin/python3", shutil.which("python3")):
        if candidate and _runs_as_nobody(candidate):
            return candidate
    pytest.skip("no Python interpreter executable by nobody")


def _as_nobody(python: str, *args: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [python, *args],
        user=NOBODY,
        group=NOBODY,
        extra_groups=[],
        cwd="/",
        env={},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def _mkdir_as_nobody(python: str, path: Path, mode: int = 0o755) -> None:
    proc = _as_nobody(python, "-c", f"import os; os.mkdir({str(path)!r}, {mode})")
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err.decode()


@pytest.fixture
def shm() -> Iterator[Path]:
    """A root-owned sticky, world-writable directory on tmpfs (like /dev/shm itself)."""
    base = Path(tempfile.mkdtemp(prefix="sa-own-", dir="/dev/shm"))
    base.chmod(0o1777)
    try:
        yield base
    finally:
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def empty_dir() -> Iterator[Path]:
    """A root-owned 0777 directory that is not sticky: a Kubernetes emptyDir."""
    base = Path(tempfile.mkdtemp(prefix="sa-ed-", dir="/dev/shm"))
    base.chmod(0o777)
    try:
        yield base
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _all_files(directory: Path) -> list[str]:
    return [str(Path(d) / f) for d, _, files in os.walk(directory) for f in files]


def test_a_squatted_render_directory_is_refused_through_a_200_rotation_swap_race(
    shm: Path, tmp_path: Path, nobody_python: str
) -> None:
    squat = shm / "app"
    outside = tmp_path / "outside"  # root-owned: where the attacker wants root to write
    outside.mkdir()
    _mkdir_as_nobody(nobody_python, squat)
    stop = shm / "stop"
    swapper = _as_nobody(nobody_python, "-c", SWAPPER, str(squat), str(outside), str(stop))
    refused: list[str] = []
    try:
        for i in range(ROTATIONS):
            try:
                writer.write_files(
                    squat, {"password": f"pw-{i}".encode()}, mode=0o400, owner=Owner()
                )
            except RenderError as exc:
                refused.append(exc.message)
    finally:
        stop.touch()
        _, err = swapper.communicate(timeout=60)
    assert swapper.returncode == 0, err.decode()
    assert len(refused) == ROTATIONS
    # Each rotation was refused before the agent made anything in the squatted
    # directory: only the swapper's own ..data links are there. (The race of
    # nobody against the agent creating its directory is the next test.)
    assert set(os.listdir(squat)) <= {"..data", "..data.moved"}
    assert f"{squat} (owner nobody uid {NOBODY}, mode 0755)" in refused[0]
    assert "Fix: chown root" in refused[0]
    assert _all_files(outside) == []
    assert not any(name.endswith("password") for name in _all_files(shm))
    with pytest.raises(RenderError, match="owner nobody"):
        writer.check_destination(squat, allow_disk=False, allowed_dirs=[], directory=True)


SQUATTER = """
import os, sys, time
dest, outside, stop = sys.argv[1:4]
squats = 0
deadline = time.monotonic() + 60
while not os.path.exists(stop) and time.monotonic() < deadline:
    try:
        if squats % 2:
            os.symlink(outside, dest)
        else:
            os.mkdir(dest, 0o777)
        squats += 1
    except OSError:
        pass
print(squats)
"""


def test_a_destination_squatted_while_the_agent_creates_it_is_refused_in_200_rotations(
    shm: Path, tmp_path: Path, nobody_python: str
) -> None:
    """nobody races the agent for the ``files`` destination in a sticky directory.

    Before each of 200 rotations the destination is removed, so the agent
    must create it again while nobody keeps creating it first (its own 0777
    directory, or a symlink to a root-owned directory). Whoever wins, the
    agent either renders into a directory it created and owns, or refuses;
    nothing is ever written outside.
    """
    dest = shm / "race"
    outside = tmp_path / "outside"
    outside.mkdir()
    stop = shm / "stop"
    squatter = _as_nobody(nobody_python, "-c", SQUATTER, str(dest), str(outside), str(stop))
    rendered = refused = 0
    try:
        for i in range(ROTATIONS):
            if dest.is_symlink() or dest.is_file():
                dest.unlink(missing_ok=True)
            else:
                shutil.rmtree(dest, ignore_errors=True)
            value = f"pw-{i}".encode()
            try:
                writer.write_files(dest, {"password": value}, mode=0o400, owner=Owner())
            except RenderError as exc:
                assert "owner nobody" in exc.message or "symlink" in exc.message, exc.message
                refused += 1
                continue
            st = os.lstat(dest)
            assert (st.st_uid, stat.S_ISDIR(st.st_mode)) == (0, True)
            assert (dest / "password").read_bytes() == value
            rendered += 1
    finally:
        stop.touch()
        out, err = squatter.communicate(timeout=60)
    assert squatter.returncode == 0, err.decode()
    squats = int(out)
    assert squats > 0, "nobody never created the destination: no race happened"
    assert rendered + refused == ROTATIONS
    assert _all_files(outside) == []


def test_a_symlink_planted_in_a_sticky_directory_is_not_followed(
    shm: Path, tmp_path: Path, nobody_python: str
) -> None:
    """nobody plants ``<shm>/app -> <root-owned dir>`` where the config names
    ``<shm>/app/...``: followed, root would write where nobody chose."""
    target = shm / "rootdir"  # root-owned, 0755, on tmpfs: passes every check itself
    target.mkdir(mode=0o755)
    link = shm / "app"
    proc = _as_nobody(nobody_python, "-c", f"import os; os.symlink({str(target)!r}, {str(link)!r})")
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err.decode()
    with pytest.raises(RenderError, match=f"{link} is a symlink \\(owner nobody"):
        writer.check_destination(link / "pw", allow_disk=False, allowed_dirs=[])
    with pytest.raises(RenderError, match="let them choose where the agent writes"):
        writer.write_file(link / "pw", b"pw", mode=0o400, owner=Owner())
    with pytest.raises(ConfigError, match=f"{link} is a symlink"):
        prepare_socket_path(link / "sock" / "agent.sock")
    assert list(target.iterdir()) == []
    # A root-owned symlink in a sticky directory, or any in a private one, is followed.
    own = shm / "own"
    own.symlink_to(target)
    assert writer.write_file(own / "pw", b"pw", mode=0o400, owner=Owner())
    assert (target / "pw").read_bytes() == b"pw"
    assert fsutil.safe_realpath(tmp_path / ".." / tmp_path.name) == tmp_path


def test_a_destination_hard_linked_by_another_user_is_replaced_not_written_through(
    shm: Path, nobody_python: str
) -> None:
    """nobody hard-links its own file at a destination in a sticky directory: the
    agent renames a new file over the name, so nobody's inode never gets the value."""
    mine, dest = shm / "mine", shm / "pw"
    code = (
        f"open({str(mine)!r}, 'w').write('mine'); import os; os.link({str(mine)!r}, {str(dest)!r})"
    )
    proc = _as_nobody(nobody_python, "-c", code)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err.decode()
    assert writer.write_file(dest, b"secret-value", mode=0o400, owner=Owner())
    assert mine.read_text() == "mine" and mine.stat().st_nlink == 1
    st = dest.stat()
    assert (st.st_uid, st.st_mode & 0o7777, dest.read_bytes()) == (0, 0o400, b"secret-value")


def test_generation_swaps_never_redirect_a_write_in_200_rotations(
    shm: Path, tmp_path: Path, nobody_python: str
) -> None:
    """A swapper with the agent's own rights (root) races every new generation directory.

    Writes go through descriptors opened no-follow right after mkdir, so a
    generation renamed away and replaced by a symlink is never written through.
    The swapper is another process, so it runs alongside the writer, not
    between its bytecodes: writes by path lost this race in 3 of 3 runs
    (a file landed outside), while a thread swapper caught them 1 time in 3.
    """
    dest = shm / "files"
    outside = tmp_path / "outside"
    outside.mkdir()
    stop = shm / "stop"
    writer.write_files(dest, {"password": b"first"}, mode=0o400, owner=Owner())
    swapper = subprocess.Popen(
        [nobody_python, "-c", SWAPPER, str(dest), str(outside), str(stop)],
        cwd="/",
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    failed = 0
    try:
        for i in range(ROTATIONS):
            try:
                writer.write_files(
                    dest, {"password": f"pw-{i}".encode()}, mode=0o400, owner=Owner()
                )
            except OSError:
                failed += 1  # ELOOP: the generation became a symlink before it was opened
    finally:
        stop.touch()
        out, err = swapper.communicate(timeout=60)
    assert swapper.returncode == 0, err.decode()
    assert int(out) > 0, "the race never happened; the test proves nothing"
    assert failed < ROTATIONS
    assert _all_files(outside) == []


def test_a_squatted_socket_directory_is_refused(shm: Path, nobody_python: str) -> None:
    squat = shm / "sock"
    _mkdir_as_nobody(nobody_python, squat)
    with pytest.raises(ConfigError) as info:
        prepare_socket_path(squat / "agent.sock")
    message = info.value.message
    assert f"{squat} (owner nobody uid {NOBODY}, mode 0755)" in message
    assert "Fix:" in message and message.startswith("listen.socket:")
    assert not (squat / "agent.sock").exists()


def test_a_socket_directory_in_a_sticky_directory_is_created_private(shm: Path) -> None:
    path = shm / "agent" / "agent.sock"
    prepare_socket_path(path)
    st = path.parent.stat()
    assert (st.st_uid, st.st_mode & 0o7777) == (0, 0o711)


def test_an_empty_dir_is_used_only_through_a_verified_subdirectory(
    empty_dir: Path, nobody_python: str
) -> None:
    path = empty_dir / "secrets-agent" / "agent.sock"
    with pytest.raises(ConfigError, match=r"listen\.shared_volume: true") as info:
        prepare_socket_path(path)
    assert f"{empty_dir} (owner root uid 0, mode 0777)" in info.value.message
    assert not path.parent.exists()

    prepare_socket_path(path, shared_volume=True)
    st = path.parent.stat()
    assert (st.st_uid, st.st_mode & 0o7777) == (0, 0o711)
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(path))
    server.close()

    # A subdirectory someone else made first is refused even on a shared volume.
    other = empty_dir / "other"
    _mkdir_as_nobody(nobody_python, other)
    with pytest.raises(ConfigError, match=f"owner nobody uid {NOBODY}"):
        prepare_socket_path(other / "agent.sock", shared_volume=True)


def test_rendering_into_an_empty_dir_needs_it_named_a_shared_volume(empty_dir: Path) -> None:
    dest = empty_dir / "app" / "password"
    with pytest.raises(RenderError, match="writable by group or others"):
        writer.write_file(dest, b"pw", mode=0o400, owner=Owner())
    assert writer.write_file(dest, b"pw", mode=0o400, owner=Owner(), shared_volumes=[empty_dir])
    assert dest.read_bytes() == b"pw"
    assert dest.parent.stat().st_mode & 0o7777 == 0o711
    with pytest.raises(RenderError, match="writable by group or others"):
        writer.write_file(
            empty_dir / "direct", b"pw", mode=0o400, owner=Owner(), shared_volumes=[empty_dir]
        )


def test_the_non_root_default_socket_is_not_a_predictable_tmp_path(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from agent.config import default_socket_path

    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    monkeypatch.setattr(os, "getuid", lambda: 1000)
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert default_socket_path() == tmp_path / ".cache" / "secrets-agent" / "agent.sock"
    monkeypatch.setenv("XDG_RUNTIME_DIR", "/run/user/1000")
    assert default_socket_path() == Path("/run/user/1000/secrets-agent/agent.sock")


def test_a_squatted_audit_directory_and_store_directory_are_refused(
    shm: Path, nobody_python: str
) -> None:
    squat = shm / "state"
    _mkdir_as_nobody(nobody_python, squat)
    with pytest.raises(ConfigError, match=f"audit directory {squat} \\(owner nobody"):
        AuditLog(squat / "audit.log")


async def test_a_store_directory_owned_by_another_user_is_refused(
    shm: Path, nobody_python: str
) -> None:
    squat = shm / "store"
    _mkdir_as_nobody(nobody_python, squat, 0o700)
    store = FileStore(squat)
    with pytest.raises(BackendUnavailable, match=f"store directory {squat} \\(owner nobody"):
        await store.read_stages("db")


def test_check_directory_names_path_owner_mode_and_fix(tmp_path: Path) -> None:
    loose = tmp_path / "loose"
    loose.mkdir()
    loose.chmod(0o775)
    with pytest.raises(fsutil.UnsafeDirectory) as info:
        fsutil.check_directory(loose, loose.stat(), shared_ok=False)
    assert info.value.message == (
        f"directory {loose} (owner root uid 0, mode 0775) is writable by group or others: "
        f"they could swap what the agent writes there. Fix: chmod go-w {loose}, or use a "
        "subdirectory that the agent creates itself"
    )


IMPOSTOR = """
import os, socket, sys
path = sys.argv[1]
s = socket.socket(socket.AF_UNIX)
s.bind(path)
os.chmod(path, 0o666)
s.listen(4)
print("ready", flush=True)
for _ in range(2):
    conn, _ = s.accept()
    try:
        if conn.recv(65536):
            body = b"attacker-value"
            conn.sendall(b"HTTP/1.0 200 OK\\r\\nContent-Type: text/plain\\r\\n"
                         b"Content-Length: " + str(len(body)).encode() + b"\\r\\n\\r\\n" + body)
    except OSError:
        pass
    conn.close()
"""


def test_the_client_refuses_a_socket_served_by_another_uid(shm: Path, nobody_python: str) -> None:
    """Finding 2's end: nobody's impostor socket is refused by an app that names the agent's uid."""
    from agent.client import SecretsClient
    from agent.client.sync import ImpostorError

    home = shm / "imp"
    _mkdir_as_nobody(nobody_python, home)
    path = home / "agent.sock"
    impostor = _as_nobody(nobody_python, "-c", IMPOSTOR, str(path))
    try:
        assert impostor.stdout is not None and impostor.stdout.readline() == b"ready\n"
        with pytest.raises(ImpostorError, match=f"served by uid {NOBODY}, not the agent's uid 0"):
            SecretsClient(path, server_uid=0).get("app/db")
        # Without the expectation the client would have believed it.
        assert SecretsClient(path).get("app/db") == "attacker-value"
    finally:
        impostor.kill()
        impostor.communicate(timeout=30)
