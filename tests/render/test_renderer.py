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


@pytest.mark.parametrize(
    ("fmt", "extra", "expected"),
    [
        ("raw", {"key": "password"}, b"s3cr3t"),
        ("json", {}, b'{\n  "username": "app",\n  "password": "s3cr3t"\n}\n'),
        ("dotenv", {}, b'username="app"\npassword="s3cr3t"\n'),
        ("yaml", {}, b"username: app\npassword: s3cr3t\n"),
    ],
)
async def test_each_format_renders_exact_bytes_with_mode_and_owner(
    tmpfs: Path, fmt: str, extra: dict[str, Any], expected: bytes
) -> None:
    dest = tmpfs / "out"
    source = DictSource({"db": make_secret("db", DB)})
    r = _renderer(
        [
            {
                "destination": str(dest),
                "secret": "db",
                "format": fmt,
                "mode": "0440",
                "owner": 65534,
                "group": 65534,
                **extra,
            }
        ],
        source,
    )
    await r.probe()
    assert await r.render_all() == []
    st = dest.stat()
    assert dest.read_bytes() == expected
    assert stat.S_IMODE(st.st_mode) == 0o440
    assert (st.st_uid, st.st_gid) == (65534, 65534)


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
        ({"key": "pasword"}, "secret 'db': the secret has no key 'pasword'"),
        (
            {
                "format": "template",
                "template": "{{ secrets.db.pasword }}",
                "secret": None,
                "secrets": ["db"],
            },
            "has no attribute 'pasword'",
        ),
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
    assert len(failures) == 1
    assert failures[0].startswith(f"templates[0] ({dest}): ")
    assert message in failures[0] and "s3cr3t" not in failures[0]
    assert dest.read_bytes() == b"previous"
    assert r.status()["templates"][0]["error"] == failures[0]


async def test_a_disk_destination_is_refused_unless_allowed(tmp_path: Path) -> None:
    dest = tmp_path / "pw"
    source = DictSource({"db": make_secret("db", DB)})
    r = _renderer([{"destination": str(dest), "secret": "db"}], source)
    if filesystem_type(tmp_path) in (TMPFS_MAGIC, RAMFS_MAGIC):
        pytest.skip("the test's temporary directory is itself on tmpfs here")
    with pytest.raises(
        ConfigError,
        match=r"templates\[0\].*is not on tmpfs or ramfs.*"
        r"allow_disk: true",
    ):
        await r.probe()
    assert not dest.exists()
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
