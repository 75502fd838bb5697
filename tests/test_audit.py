"""The audit log: hash chain, rotation, failure modes, and ``audit verify``."""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import shutil
import stat
import time
from pathlib import Path
from typing import Any

import pytest

from agent.audit import GENESIS, AuditLog, AuditUnavailable, NullAudit, verify
from agent.commands import audit as audit_command
from agent.config import AuditConfig
from agent.errors import ConfigError
from agent.metrics import Metrics
from agent.server.peer import Caller

CALLER = Caller("unix", uid=1000, gid=1000, pid=4242, groups=frozenset({1000}), exe="/bin/app")


def lines(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines()


def docs(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in lines(path)]


def write(log: AuditLog, n: int, start: int = 0) -> None:
    for i in range(start, start + n):
        log.record("read", caller=CALLER, secret=f"app/s{i}", version="v1", outcome="allowed")


def cli_verify(*files: Path) -> int:
    """``secrets-agent audit verify FILES`` through the command module's parser."""
    parser = argparse.ArgumentParser()
    audit_command.register(parser.add_subparsers())
    args = parser.parse_args(["audit", "verify", *map(str, files)])
    code: int = args.func(args)
    return code


async def test_records_are_json_lines_chained_by_sha256(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    log = AuditLog(path)
    log.record(
        "read",
        caller=CALLER,
        secret="app/db",
        version="v1",
        stage="CURRENT",
        outcome="allowed",
        reason="access[0]",
    )
    log.record("denied", caller=Caller("tcp", token="ci"), secret="x", outcome="denied")
    log.record("config_reloaded", outcome="applied")
    await log.aclose()
    first, second, third = docs(path)
    assert first == {
        "seq": 1,
        "time": first["time"],
        "event": "read",
        "outcome": "allowed",
        "caller": {"listener": "unix", "uid": 1000, "gid": 1000, "pid": 4242, "exe": "/bin/app"},
        "secret": "app/db",
        "version": "v1",
        "stage": "CURRENT",
        "reason": "access[0]",
        "prev": GENESIS,
    }
    assert first["time"].endswith("Z")
    raw = lines(path)
    assert second["prev"] == hashlib.sha256(raw[0]).hexdigest()
    assert second["caller"] == {"listener": "tcp", "token": "ci"}
    assert third["prev"] == hashlib.sha256(raw[1]).hexdigest()
    assert [d["seq"] for d in (first, second, third)] == [1, 2, 3]
    assert log.head == hashlib.sha256(raw[2]).hexdigest()


async def test_the_file_is_created_0600_append_only_and_symlinks_are_refused(
    tmp_path: Path,
) -> None:
    path = tmp_path / "audit.log"
    log = AuditLog(path)
    write(log, 1)
    await log.aclose()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    link = tmp_path / "link.log"
    link.symlink_to(path)
    with pytest.raises(ConfigError, match=r"audit\.path"):
        AuditLog(link)


async def test_a_restart_continues_the_chain_of_the_existing_file(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    first = AuditLog(path)
    write(first, 3)
    await first.aclose()
    second = AuditLog(path)
    write(second, 2, start=3)
    await second.aclose()
    assert [d["seq"] for d in docs(path)] == [1, 2, 3, 4, 5]
    assert verify([path]).ok


async def test_a_file_renamed_away_by_logrotate_continues_the_chain_in_a_new_file(
    tmp_path: Path,
) -> None:
    path = tmp_path / "audit.log"
    rotated = tmp_path / "audit.log.1"
    log = AuditLog(path)
    write(log, 3)
    path.rename(rotated)
    write(log, 2, start=3)
    await log.aclose()
    assert len(lines(rotated)) == 3 and len(lines(path)) == 2
    assert docs(path)[0]["prev"] == hashlib.sha256(lines(rotated)[-1]).hexdigest()
    assert docs(path)[0]["seq"] == 4
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert verify([rotated, path]).records == 5
    assert verify([path]).ok  # alone, its first line anchors the chain
    assert not verify([path, rotated]).ok  # files in the wrong order break it


async def test_copytruncate_and_reopen_keep_the_chain(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    copy = tmp_path / "audit.log.1"
    log = AuditLog(path)
    write(log, 2)
    shutil.copyfile(path, copy)
    os.truncate(path, 0)
    write(log, 1, start=2)
    log.reopen()
    write(log, 1, start=3)
    await log.aclose()
    assert verify([copy, path]).records == 4


async def test_stdout_mode_writes_the_same_chain_to_fd_1(capfd: pytest.CaptureFixture[str]) -> None:
    log = AuditLog.from_config(AuditConfig(path="-"))
    assert isinstance(log, AuditLog)
    write(log, 2)
    await log.aclose()
    out = capfd.readouterr().out.encode().splitlines()
    assert json.loads(out[1])["prev"] == hashlib.sha256(out[0]).hexdigest()


async def test_from_config_resolves_paths_and_fails_early(tmp_path: Path) -> None:
    assert isinstance(AuditLog.from_config(AuditConfig(path=None)), NullAudit)
    log = AuditLog.from_config(AuditConfig(path="./a.log"), base_dir=tmp_path)
    assert isinstance(log, AuditLog) and log.path == tmp_path / "a.log"
    await log.aclose()
    with pytest.raises(ConfigError, match="cannot open audit log"):
        AuditLog.from_config(AuditConfig(path=str(tmp_path / "no-dir" / "a.log")))


async def test_events_are_counted_by_name(tmp_path: Path) -> None:
    metrics = Metrics()
    log = AuditLog(tmp_path / "a.log", metrics=metrics)
    write(log, 2)
    log.record("denied", outcome="denied")
    await log.aclose()
    sample = metrics.registry.get_sample_value
    assert sample("secrets_agent_audit_events_total", {"event": "read"}) == 2
    assert sample("secrets_agent_audit_events_total", {"event": "denied"}) == 1


async def test_event_names_are_checked(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "a.log")
    with pytest.raises(ValueError, match="snake_case"):
        log.record("Read Secret!", outcome="x")
    await log.aclose()


async def test_a_failed_write_refuses_required_records_and_drops_others_without_breaking_the_chain(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "a.log"
    log = AuditLog(path)
    write(log, 1)

    def full(fd: int, data: bytes) -> int:
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as patch:
        patch.setattr(os, "write", full)
        with pytest.raises(AuditUnavailable):
            log.record("read", secret="a", outcome="allowed", required=True)
        log.record("rendered", outcome="written")  # dropped, logged once
        assert log.status()["failing"] is True
    assert caplog.text.count("cannot write the audit log") == 1
    write(log, 1, start=1)
    await log.aclose()
    assert log.status()["failing"] is False
    # The gap is recorded: the two records that could not be written are counted.
    written = docs(path)
    assert [d["seq"] for d in written] == [1, 2, 3]
    assert written[1]["event"] == "records_dropped" and written[1]["count"] == 2
    assert verify([path]).ok


async def test_a_closed_log_refuses_required_records(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "a.log")
    await log.aclose()
    log.record("rendered", outcome="written")
    with pytest.raises(AuditUnavailable):
        log.record("read", outcome="allowed", required=True)


# ------------------------------------------------------------------------- verify


@pytest.fixture
async def chain(tmp_path: Path) -> Path:
    path = tmp_path / "audit.log"
    log = AuditLog(path)
    write(log, 10)
    await log.aclose()
    return path


def test_verify_accepts_an_intact_log(chain: Path, capsys: pytest.CaptureFixture[str]) -> None:
    verdict = verify([chain])
    assert verdict.ok and verdict.records == 10
    assert verdict.head == hashlib.sha256(lines(chain)[-1]).hexdigest()
    assert cli_verify(chain) == 0
    assert capsys.readouterr().out.splitlines() == [
        "ok: 10 records",
        f"head: sha256:{verdict.head}",
    ]


def _rewrite(path: Path, new: list[bytes]) -> None:
    path.write_bytes(b"".join(line + b"\n" for line in new))


def test_verify_finds_an_edited_line(chain: Path, capsys: pytest.CaptureFixture[str]) -> None:
    raw = lines(chain)
    raw[4] = raw[4].replace(b'"outcome":"allowed"', b'"outcome":"denied"')
    _rewrite(chain, raw)
    verdict = verify([chain])
    assert (verdict.ok, verdict.line, verdict.records) == (False, 6, 5)
    assert "prev hash does not match" in (verdict.reason or "")
    assert cli_verify(chain) == 1
    assert f"broken: {chain}:6: prev hash does not match" in capsys.readouterr().out


def test_verify_finds_a_deleted_line(chain: Path) -> None:
    raw = lines(chain)
    del raw[3]
    _rewrite(chain, raw)
    verdict = verify([chain])
    assert (verdict.ok, verdict.line) == (False, 4)
    assert verdict.reason == "seq 5 follows 3: record(s) missing"


def test_verify_finds_a_deleted_line_even_with_renumbered_seqs(chain: Path) -> None:
    raw = [json.loads(line) for line in lines(chain)]
    del raw[3]
    for i, doc in enumerate(raw, start=1):
        doc["seq"] = i
    _rewrite(chain, [json.dumps(d, separators=(",", ":")).encode() for d in raw])
    verdict = verify([chain])
    assert (verdict.ok, verdict.line) == (False, 4)
    assert "prev hash does not match" in (verdict.reason or "")


def test_verify_finds_a_reordered_pair(chain: Path) -> None:
    raw = lines(chain)
    raw[6], raw[7] = raw[7], raw[6]
    _rewrite(chain, raw)
    verdict = verify([chain])
    assert (verdict.ok, verdict.line) == (False, 7)
    assert verdict.reason == "seq 8 follows 6: record(s) missing"


def test_verify_finds_garbage(chain: Path) -> None:
    raw = lines(chain)
    raw.insert(2, b"not json")
    _rewrite(chain, raw)
    verdict = verify([chain])
    assert (verdict.ok, verdict.line, verdict.reason) == (False, 3, "not valid JSON")


def test_verify_cannot_see_lines_cut_from_the_end(chain: Path) -> None:
    """Documented limit (docs/security.md): truncation shows only against a saved head."""
    full_head = verify([chain]).head
    _rewrite(chain, lines(chain)[:-2])
    verdict = verify([chain])
    assert verdict.ok
    assert verdict.head != full_head


def test_verify_reports_an_unreadable_file(tmp_path: Path) -> None:
    assert cli_verify(tmp_path / "missing.log") == 1


async def test_verify_checks_100000_records_in_under_10_seconds(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "big.log"
    log = AuditLog(path)
    started = time.perf_counter()
    write(log, 100_000)
    written = time.perf_counter() - started
    await log.aclose()
    started = time.perf_counter()
    verdict = verify([path])
    elapsed = time.perf_counter() - started
    assert verdict.ok and verdict.records == 100_000
    assert elapsed < 10, f"verify took {elapsed:.2f}s"
    with caplog.at_level(logging.INFO):
        logging.getLogger(__name__).info(
            "100k records: write %.2fs (%.1f us each), verify %.2fs",
            written,
            written * 10,
            elapsed,
        )
