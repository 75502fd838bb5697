"""The writer on a real tmpfs: the ``files`` swap, crash leftovers, refused destinations."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from agent.config import RenderConfig, TemplateConfig
from agent.errors import ConfigError
from agent.metrics import Metrics
from agent.render import writer
from agent.render.formats import RenderError
from agent.render.renderer import Renderer
from agent.render.writer import Owner
from tests.render.conftest import DictSource, make_secret

DB = '{"username": "app", "password": "s3cr3t"}'


def _renderer(templates: list[dict[str, Any]], **render: Any) -> Renderer:
    cfgs = [TemplateConfig.model_validate(t) for t in templates]
    source = DictSource({"db": make_secret("db", DB)})
    return Renderer(cfgs, source, render_config=RenderConfig(**render), metrics=Metrics())


async def test_files_into_a_tmpfs_mount_point_inside_a_disk_directory(tmpfs: Path) -> None:
    """An ``emptyDir``-style mount is checked itself, not the disk directory holding it."""
    r = _renderer([{"destination": str(tmpfs), "secret": "db", "format": "files"}])
    await r.probe()
    assert await r.render_all() == []
    assert (tmpfs / "password").read_bytes() == b"s3cr3t"


async def test_a_symlinked_files_directory_is_refused(tmpfs: Path) -> None:
    (tmpfs / "real").mkdir()
    (tmpfs / "dir").symlink_to(tmpfs / "real")
    r = _renderer([{"destination": str(tmpfs / "dir"), "secret": "db", "format": "files"}])
    with pytest.raises(ConfigError, match=r"templates\[0\] .*dir is a symlink; refusing"):
        await r.probe()
    assert len(await r.render_all()) == 1
    assert list((tmpfs / "real").iterdir()) == []


def test_a_key_link_pointing_elsewhere_is_replaced_and_its_target_untouched(tmpfs: Path) -> None:
    dest, outside = tmpfs / "d", tmpfs / "outside"
    outside.write_bytes(b"keep")
    dest.mkdir()
    (dest / "password").symlink_to(outside)
    (dest / "username").write_bytes(b"planted")
    files = {"password": b"s3cr3t", "username": b"app"}
    assert writer.write_files(dest, files, mode=0o400, owner=Owner())
    assert os.readlink(dest / "password") == "..data/password"
    assert os.readlink(dest / "username") == "..data/username"
    assert (dest / "password").read_bytes() == b"s3cr3t"
    assert outside.read_bytes() == b"keep"
    # Nothing differs now: no write, no new generation.
    assert not writer.write_files(dest, files, mode=0o400, owner=Owner())


def test_start_up_removes_crash_leftovers_and_only_ours(tmpfs: Path) -> None:
    dest = tmpfs / "pw"
    dest.write_bytes(b"live")
    stale = tmpfs / ".pw.0123456789ab.tmp"
    stale.write_bytes(b"half")
    other = tmpfs / ".other.0123456789ab.tmp"
    other.write_bytes(b"not ours")
    assert writer.remove_stale_temps(dest) == 1
    assert sorted(p.name for p in tmpfs.iterdir()) == [".other.0123456789ab.tmp", "pw"]


def test_start_up_removes_orphan_generations_of_a_files_directory(tmpfs: Path) -> None:
    dest = tmpfs / "d"
    writer.write_files(dest, {"k": b"v"}, mode=0o400, owner=Owner())
    live = os.readlink(dest / "..data")
    (dest / "..2020_01_01_00_00_00.dead").mkdir()
    (dest / "..2020_01_01_00_00_00.dead" / "k").write_bytes(b"old")
    os.symlink("..2020_01_01_00_00_00.dead", dest / "...data.0badc0de.tmp")
    assert writer.remove_stale_temps(dest, directory=True) == 2
    assert sorted(p.name for p in dest.iterdir()) == sorted(["..data", live, "k"])
    assert (dest / "k").read_bytes() == b"v"


async def test_allowed_dirs_cannot_be_left_through_a_symlinked_directory(tmpfs: Path) -> None:
    (tmpfs / "ok").mkdir()
    (tmpfs / "outside").mkdir()
    (tmpfs / "ok" / "escape").symlink_to(tmpfs / "outside")
    inside = _renderer(
        [{"destination": str(tmpfs / "ok" / "pw"), "secret": "db"}], allowed_dirs=[tmpfs / "ok"]
    )
    await inside.probe()
    escape = _renderer(
        [{"destination": str(tmpfs / "ok" / "escape" / "pw"), "secret": "db"}],
        allowed_dirs=[tmpfs / "ok"],
    )
    with pytest.raises(ConfigError, match=r"outside render\.allowed_dirs"):
        await escape.probe()
    assert len(await escape.render_all()) == 1
    assert list((tmpfs / "outside").iterdir()) == []


async def test_a_directory_at_a_file_destination_is_refused_at_start(tmpfs: Path) -> None:
    (tmpfs / "pw").mkdir()
    r = _renderer([{"destination": str(tmpfs / "pw"), "secret": "db"}])
    with pytest.raises(ConfigError, match="exists and is not a regular file"):
        await r.probe()


async def test_the_probe_names_a_missing_directory_and_an_unknown_owner(tmpfs: Path) -> None:
    missing = _renderer([{"destination": str(tmpfs / "nodir" / "pw"), "secret": "db"}])
    with pytest.raises(ConfigError, match=r"templates\[0\] .*directory .*nodir does not exist"):
        await missing.probe()
    owner = _renderer(
        [{"destination": str(tmpfs / "pw"), "secret": "db", "owner": "no-such-user-here"}]
    )
    with pytest.raises(ConfigError, match="unknown owner or group: 'no-such-user-here'"):
        await owner.probe()
    assert list(tmpfs.iterdir()) == []  # the probe left nothing behind


def test_the_probe_reports_an_owner_the_agent_may_not_give_files_to(
    tmpfs: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(fd: int, uid: int, gid: int) -> None:
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "fchown", refuse)
    with pytest.raises(RenderError, match=r"cannot give files to owner 65534.*CAP_CHOWN"):
        writer.probe(tmpfs / "pw", owner=Owner(65534, None))
    assert list(tmpfs.iterdir()) == []
