"""Rendering to a real tmpfs: exact bytes, modes, owners, minimal writes, errors."""

from __future__ import annotations

import asyncio
import os
import stat
import sys
from pathlib import Path
from typing import Any

import pytest

from agent.config import RenderConfig, TemplateConfig
from agent.errors import ConfigError
from agent.metrics import Metrics
from agent.render.renderer import Renderer
from agent.render.writer import RAMFS_MAGIC, TMPFS_MAGIC, filesystem_type
from tests.render.conftest import DictSource, make_secret

DB = '{"username": "app", "password": "s3cr3t"}'


def _renderer(templates: list[dict[str, Any]], source: DictSource, **render: Any) -> Renderer:
    cfgs = [TemplateConfig.model_validate(t) for t in templates]
    return Renderer(cfgs, source, render_config=RenderConfig(**render), metrics=Metrics())


TEMPLATE = "u={{ secrets['db'].username }} p={{ secret('db', 'password') | shell_quote }}\n"
FORMATS: list[tuple[str, dict[str, Any], bytes | dict[str, bytes]]] = [
    ("raw", {"key": "password"}, b"s3cr3t"),
    ("raw", {}, DB.encode()),
    ("json", {}, b'{\n  "username": "app",\n  "password": "s3cr3t"\n}\n'),
    ("dotenv", {}, b'username="app"\npassword="s3cr3t"\n'),
    ("yaml", {}, b"username: app\npassword: s3cr3t\n"),
    ("files", {}, {"username": b"app", "password": b"s3cr3t"}),
    ("template", {"template": TEMPLATE, "secret": None, "secrets": ["db"]}, b"u=app p=s3cr3t\n"),
]


def _snapshot(dest: Path, expected: bytes | dict[str, bytes]) -> list[tuple[int, int]]:
    """Check bytes, mode 0440 and owner nobody; return (inode, mtime_ns) of each file."""
    paths = [dest] if isinstance(expected, bytes) else [dest / name for name in expected]
    contents = [expected] if isinstance(expected, bytes) else list(expected.values())
    out = []
    for path, content in zip(paths, contents, strict=True):
        st = path.stat()
        assert path.read_bytes() == content
        assert stat.S_IMODE(st.st_mode) == 0o440
        assert (st.st_uid, st.st_gid) == (65534, 65534)
        out.append((st.st_ino, st.st_mtime_ns))
    return out


def _renders(r: Renderer, outcome: str, template: str = "0") -> float:
    value = r.metrics.registry.get_sample_value(
        "secrets_agent_renders_total", {"template": template, "outcome": outcome}
    )
    return value or 0.0


@pytest.mark.parametrize(
    ("fmt", "extra", "expected"), FORMATS, ids=[f"{f[0]}-{i}" for i, f in enumerate(FORMATS)]
)
async def test_each_format_renders_exact_bytes_mode_owner_and_only_once(
    tmpfs: Path, fmt: str, extra: dict[str, Any], expected: bytes | dict[str, bytes]
) -> None:
    """Exact bytes with mode 0440 and owner nobody; a second, unchanged render touches nothing."""
    dest = tmpfs / "out"
    source = DictSource({"db": make_secret("db", DB)})
    template = {"destination": str(dest), "secret": "db", "format": fmt, "mode": "0440"}
    r = _renderer([{**template, "owner": 65534, "group": "nogroup", **extra}], source)
    await r.probe()
    assert await r.render_all() == []
    first = _snapshot(dest, expected)
    data_link = os.readlink(dest / "..data") if fmt == "files" else None
    source.secrets["db"] = make_secret("db", DB, version="v2")  # same bytes, new version
    assert await r.render_all() == []
    assert _snapshot(dest, expected) == first
    assert (os.readlink(dest / "..data") if fmt == "files" else None) == data_link
    assert (_renders(r, "written"), _renders(r, "unchanged")) == (1, 1)


async def test_template_over_several_secrets(tmpfs: Path) -> None:
    dest = tmpfs / "conf"
    source = DictSource({"db": make_secret("db", DB), "api": make_secret("api", "tok")})
    text = "db={{ secrets['db'].username }}:{{ secrets['db'].password }} api={{ secrets.api }}\n"
    r = _renderer(
        [
            {
                "destination": str(dest),
                "secrets": ["db", "api"],
                "format": "template",
                "template": text,
            }
        ],
        source,
    )
    assert await r.render_all() == []
    assert dest.read_bytes() == b"db=app:s3cr3t api=tok\n"
    assert stat.S_IMODE(dest.stat().st_mode) == 0o400


async def test_files_format_swaps_a_data_symlink(tmpfs: Path) -> None:
    dest = tmpfs / "dir"
    source = DictSource({"db": make_secret("db", DB)})
    r = _renderer([{"destination": str(dest), "secret": "db", "format": "files"}], source)
    assert await r.render_all() == []
    assert (dest / "password").read_bytes() == b"s3cr3t"
    assert os.readlink(dest / "password") == "..data/password"
    first = os.readlink(dest / "..data")
    source.secrets["db"] = make_secret("db", '{"password": "new"}', version="v2")
    assert await r.render_all() == []
    assert (dest / "password").read_bytes() == b"new"
    assert not (dest / "username").exists()  # a key that went away goes away
    assert os.readlink(dest / "..data") != first
    assert not (dest / first).exists()  # the old generation is removed


async def test_an_unchanged_render_neither_rewrites_nor_notifies(tmpfs: Path) -> None:
    dest = tmpfs / "pw"
    count = tmpfs / "count"
    source = DictSource({"db": make_secret("db", DB)})
    r = _renderer(
        [
            {
                "destination": str(dest),
                "secret": "db",
                "key": "password",
                "on_change": {
                    "command": [sys.executable, "-c", f"open({str(count)!r}, 'a').write('x')"]
                },
            }
        ],
        source,
    )
    task = asyncio.create_task(r.run())
    try:
        await _until(lambda: count.exists() and count.read_text() == "x")
        before = dest.stat()
        for _ in range(3):
            r.on_secret_changed("db")
            await asyncio.sleep(0.05)
        await _until(lambda: r.status()["templates"][0]["renders"] >= 4)
        after = dest.stat()
        assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
        await asyncio.sleep(0.2)
        assert count.read_text() == "x"  # notified once, for the first write only
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def _until(check: Any, timeout: float = 10) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not check():
        if loop.time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.01)


@pytest.mark.parametrize(
    ("template", "message"),
    [
        ({"key": "pasword"}, "secret 'db' has no key 'pasword'"),
        (
            {
                "format": "template",
                "template": "{{ secrets.db.pasword }}",
                "secret": None,
                "secrets": ["db"],
            },
            "template error: undefined name, key or attribute, line 1 (template over secrets 'db')",
        ),
        (
            {"format": "template", "template": "{{ nope }}", "secret": None, "secrets": ["db"]},
            "template error: undefined name, key or attribute, line 1 (template over secrets 'db')",
        ),
        ({"secret": "missing"}, "secret 'missing' does not exist"),
    ],
)
async def test_a_failed_render_keeps_the_previous_file(
    tmpfs: Path, template: dict[str, Any], message: str
) -> None:
    dest = tmpfs / "pw"
    dest.write_bytes(b"previous")
    os.chmod(dest, 0o400)
    source = DictSource({"db": make_secret("db", DB)})
    r = _renderer([{"destination": str(dest), "secret": "db", **template}], source)
    failures = await r.render_all()
    assert failures == [f"templates[0] ({dest}): {message}"]
    assert dest.read_bytes() == b"previous"
    assert r.status()["templates"][0]["error"] == failures[0]


async def test_a_disk_destination_is_refused_unless_allowed(tmp_path: Path) -> None:
    """Refused at the probe and at every render, with the reason and the fix; the file stays."""
    dest = tmp_path / "pw"
    dest.write_bytes(b"previous")
    source = DictSource({"db": make_secret("db", DB)})
    r = _renderer([{"destination": str(dest), "secret": "db"}], source)
    if filesystem_type(tmp_path) in (TMPFS_MAGIC, RAMFS_MAGIC):
        pytest.skip("the test's temporary directory is itself on tmpfs here")
    expected = (
        f"templates[0] ({dest}): {tmp_path} is not on tmpfs or ramfs (filesystem type "
        f"{filesystem_type(tmp_path):#x}): a secret written there reaches the disk. Use a tmpfs "
        "(e.g. /dev/shm, /run, an emptyDir with medium: Memory) or set allow_disk: true for "
        "this template"
    )
    with pytest.raises(ConfigError) as info:
        await r.probe()
    assert str(info.value) == expected
    assert await r.render_all() == [expected]
    assert dest.read_bytes() == b"previous"
    ok = _renderer([{"destination": str(dest), "secret": "db", "allow_disk": True}], source)
    await ok.probe()
    assert await ok.render_all() == []


async def test_a_symlinked_destination_is_refused_and_the_target_untouched(tmpfs: Path) -> None:
    target = tmpfs / "target"
    target.write_bytes(b"previous")
    dest = tmpfs / "link"
    dest.symlink_to(target)
    source = DictSource({"db": make_secret("db", DB)})
    r = _renderer([{"destination": str(dest), "secret": "db"}], source)
    with pytest.raises(ConfigError, match="is a symlink"):
        await r.probe()
    failures = await r.render_all()
    assert "is a symlink" in failures[0]
    assert target.read_bytes() == b"previous"


async def test_destinations_outside_allowed_dirs_are_refused(tmpfs: Path) -> None:
    (tmpfs / "ok").mkdir()
    source = DictSource({"db": make_secret("db", DB)})
    r = _renderer(
        [{"destination": str(tmpfs / "pw"), "secret": "db"}],
        source,
        allowed_dirs=[str(tmpfs / "ok")],
    )
    with pytest.raises(ConfigError, match=r"outside render\.allowed_dirs"):
        await r.probe()


async def test_cleanup_on_exit_removes_rendered_files(tmpfs: Path) -> None:
    source = DictSource({"db": make_secret("db", DB)})
    r = _renderer(
        [
            {"destination": str(tmpfs / "pw"), "secret": "db"},
            {"destination": str(tmpfs / "d"), "secret": "db", "format": "files"},
        ],
        source,
        cleanup_on_exit=True,
    )
    assert await r.render_all() == []
    await r.cleanup()
    assert list(tmpfs.iterdir()) == []


class _Broken(DictSource):
    async def get(self, name: str, *, stage: str | None = None, version: str | None = None) -> Any:
        if name == "bad":
            raise RuntimeError("boom: s3cr3t")
        return await super().get(name, stage=stage, version=version)


async def test_an_unexpected_error_in_one_template_does_not_stop_the_others(tmpfs: Path) -> None:
    source = _Broken({"db": make_secret("db", DB)})
    r = _renderer(
        [
            {"destination": str(tmpfs / "bad"), "secret": "bad"},
            {"destination": str(tmpfs / "pw"), "secret": "db", "key": "password"},
        ],
        source,
    )
    task = asyncio.create_task(r.run())
    try:
        await _until(lambda: (tmpfs / "pw").exists())
        await _until(lambda: r.status()["templates"][0]["error"] is not None)
        assert r.status()["templates"][0]["error"] == (
            f"templates[0] ({tmpfs / 'bad'}): unexpected RuntimeError"
        )
        source.secrets["db"] = make_secret("db", '{"password": "new"}', version="v2")
        r.on_secret_changed("db")
        await _until(lambda: (tmpfs / "pw").read_bytes() == b"new")
        assert not task.done()
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_a_failed_render_is_retried_at_once_when_its_secret_changes(tmpfs: Path) -> None:
    """The backoff does not delay the render that a fixing rotation allows."""
    dest = tmpfs / "pw"
    source = DictSource({"db": make_secret("db", '{"user": "app"}')})
    r = _renderer([{"destination": str(dest), "secret": "db", "key": "password"}], source)
    r.retry_initial = 600.0  # a retry by timer cannot happen during this test
    task = asyncio.create_task(r.run())
    try:
        await _until(lambda: r.status()["templates"][0]["error"] is not None)
        source.secrets["db"] = make_secret("db", DB, version="v2")
        r.on_secret_changed("db")
        await _until(lambda: dest.exists())
        assert dest.read_bytes() == b"s3cr3t"
        assert r.status()["templates"][0]["error"] is None
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
