"""The writer CLI and config handling, run in-process through ``main(argv)``."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from agent.cli import main
from agent.keys.local import LocalKeyProvider
from tests.agentenv import AgentEnv

BAD_CONFIGS = sorted((Path(__file__).parent / "configs" / "bad").glob("*.yaml"))


def test_init_creates_private_keyring_config_and_store(env: AgentEnv) -> None:
    assert stat.S_IMODE((env.dir / "keyring.json").stat().st_mode) == 0o600
    assert stat.S_IMODE(env.config_path.stat().st_mode) == 0o600
    assert (env.dir / "store").is_dir()
    code, out, _ = env.cli("check-config")
    assert code == 0 and "ok" in out


def test_init_twice_keeps_the_existing_keyring(env: AgentEnv) -> None:
    before = (env.dir / "keyring.json").read_bytes()
    assert main(["init", "--dir", str(env.dir)]) == 0
    assert (env.dir / "keyring.json").read_bytes() == before


def test_put_makes_current_and_moves_the_old_current_to_previous(env: AgentEnv) -> None:
    v1 = env.put("prod/db", "one")
    v2 = env.put("prod/db", "two")
    _code, out, _ = env.cli("describe", "prod/db", "--json")
    doc = json.loads(out)
    assert doc["stages"] == {"CURRENT": v2, "PREVIOUS": v1}
    assert "one" not in out and "two" not in out  # describe never shows values
    assert env.cli("get", "prod/db") == (0, "two", "")
    assert env.cli("get", "prod/db", "--stage", "AWSPREVIOUS")[1] == "one"
    assert env.cli("get", "prod/db", "--version", v1)[1] == "one"


def test_promote_moves_a_stage_to_an_existing_version(env: AgentEnv) -> None:
    v1 = env.put("app/key", "one")
    v2 = env.put("app/key", "two")
    code, out, err = env.cli("promote", "app/key", "CURRENT", v1)
    assert code == 0, err
    assert env.cli("get", "app/key")[1] == "one"
    assert f"PREVIOUS={v2}" in out
    code, _, err = env.cli("promote", "app/key", "CURRENT", "no-such-version")
    assert code == 1 and "no version 'no-such-version'" in err


def test_put_json_validates_and_get_key_reads_one_field(env: AgentEnv) -> None:
    code, _, err = env.cli("put", "db", "--json", stdin=b"{not json")
    assert code == 2 and "not valid JSON" in err
    env.put("db", '{"username": "app", "password": "pw", "port": 5432}', "--json")
    assert env.cli("get", "db", "--key", "password")[1] == "pw"
    assert env.cli("get", "db", "--key", "port")[1] == "5432"
    code, _, err = env.cli("get", "db", "--key", "nope")
    assert code == 1 and "no key 'nope'" in err and "pw" not in err


def test_put_value_flag_warns_about_the_process_list(env: AgentEnv) -> None:
    code, _, err = env.cli("put", "x", "--value", "visible")
    assert code == 0 and "process list" in err and "visible" not in err


def test_put_from_file_and_binary_values(env: AgentEnv, tmp_path: Path) -> None:
    blob = bytes(range(256))
    (tmp_path / "blob").write_bytes(blob)
    code, _, err = env.cli("put", "bin", "--file", str(tmp_path / "blob"))
    assert code == 2 and "not UTF-8" in err
    assert env.cli("put", "bin", "--binary", "--file", str(tmp_path / "blob"))[0] == 0
    assert env.cli("list")[1].startswith("bin\t")


def test_invalid_names_are_usage_errors(env: AgentEnv) -> None:
    for name in ("../etc/passwd", "/abs", "a//b", "x" * 513, "sp ace"):
        code, _, err = env.cli("put", name, "--value", "v")
        assert code == 2, name
        assert "invalid secret name" in err


@pytest.mark.parametrize("path", BAD_CONFIGS, ids=[p.name for p in BAD_CONFIGS])
def test_bad_config_fails_with_its_documented_error(
    path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    expected = path.read_text().splitlines()[0].removeprefix("# expect: ")
    for command in ("check-config", "run"):
        assert main(["-c", str(path), command]) == 2
        err = capsys.readouterr().err
        assert expected in err, err


def test_config_flag_after_the_subcommand_and_from_the_environment(
    env: AgentEnv, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert main(["check-config", "-c", str(env.config_path)]) == 0
    monkeypatch.setenv("SECRETS_AGENT_CONFIG", str(env.config_path))
    assert main(["check-config"]) == 0
    monkeypatch.setenv("SECRETS_AGENT_CONFIG", "/nonexistent/agent.yaml")
    assert main(["check-config"]) == 2


def test_import_of_1000_secrets_wraps_at_most_two_data_keys(
    env: AgentEnv, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    wraps = []
    original = LocalKeyProvider.wrap

    async def counting_wrap(self: LocalKeyProvider, dek: bytes, **kw: object) -> object:
        wraps.append(1)
        return await original(self, dek, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(LocalKeyProvider, "wrap", counting_wrap)
    doc = {f"bulk/s{i:04d}": f"value-{i}" for i in range(1000)}
    (tmp_path / "bulk.json").write_text(json.dumps(doc))
    code, _, err = env.cli("import", str(tmp_path / "bulk.json"))
    assert code == 0, err
    assert "1000/1000" in err
    assert len(wraps) <= 2
    assert env.cli("get", "bulk/s0999")[1] == "value-999"


def test_import_reads_yaml_and_dotenv(env: AgentEnv, tmp_path: Path) -> None:
    (tmp_path / "s.yaml").write_text("a/one: x\na/two: {user: u, password: p}\n")
    (tmp_path / ".env").write_text("# comment\nexport DB_PASSWORD='q w'\nTOKEN=t\n")
    assert env.cli("import", str(tmp_path / "s.yaml"))[0] == 0
    assert env.cli("import", str(tmp_path / ".env"), "--prefix", "env/")[0] == 0
    assert json.loads(env.cli("get", "a/two")[1]) == {"user": "u", "password": "p"}
    assert env.cli("get", "env/DB_PASSWORD")[1] == "q w"


def test_keys_rotate_wraps_new_data_keys_with_the_new_version(env: AgentEnv) -> None:
    env.put("k", "before")
    code, out, _ = env.cli("keys", "rotate")
    assert code == 0 and "v2" in out
    env.put("k2", "after")
    assert env.cli("get", "k")[1] == "before"  # old envelopes still open
    assert env.cli("get", "k2")[1] == "after"
    code, out, _ = env.cli("keys", "list")
    assert "v1" in out and "v2" in out and "primary" in out
    assert '"key_rotated"' in (env.dir / "audit.log").read_text()
    code, out, _ = env.cli("audit", "verify", str(env.dir / "audit.log"))
    assert code == 0 and out.startswith("ok: 1 records")


def test_readable_keyring_is_refused(env: AgentEnv) -> None:
    env.put("k", "v")
    os.chmod(env.dir / "keyring.json", 0o644)
    code, _, err = env.cli("get", "k")
    assert code != 0 and "chmod 600" in err


def test_a_second_import_of_the_same_file_leaves_unchanged_values_alone(
    env: AgentEnv, tmp_path: Path
) -> None:
    """No new version for an unchanged value: PREVIOUS keeps the real previous value."""
    env.put("imp/a", "old-a")
    (tmp_path / "s.json").write_text(json.dumps({"imp/a": "new-a", "imp/b": "b"}))
    code, _, err = env.cli("import", str(tmp_path / "s.json"))
    assert code == 0 and "2 written, 0 unchanged" in err, err
    before = json.loads(env.cli("describe", "imp/a", "--json")[1])
    code, _, err = env.cli("import", str(tmp_path / "s.json"))
    assert code == 0 and "0 written, 2 unchanged" in err, err
    after = json.loads(env.cli("describe", "imp/a", "--json")[1])
    assert after == before and len(after["versions"]) == 2
    assert env.cli("get", "imp/a", "--stage", "PREVIOUS")[1] == "old-a"
    (tmp_path / "s.json").write_text(json.dumps({"imp/a": "newer-a", "imp/b": "b"}))
    code, _, err = env.cli("import", str(tmp_path / "s.json"))
    assert code == 0 and "1 written, 1 unchanged" in err, err
    assert env.cli("get", "imp/a", "--stage", "PREVIOUS")[1] == "new-a"


def test_import_progress_off_a_terminal_has_a_rate_and_one_line_per_update(
    env: AgentEnv, tmp_path: Path
) -> None:
    (tmp_path / "s.json").write_text(json.dumps({f"p/s{i}": str(i) for i in range(30)}))
    code, _, err = env.cli("import", str(tmp_path / "s.json"))
    assert code == 0
    assert "\r" not in err
    last = [line for line in err.splitlines() if "30/30" in line][-1]
    assert last.startswith("import: 100%") and "secret/s" in last, err


def test_exec_errors_are_one_line_with_a_documented_status(env: AgentEnv, tmp_path: Path) -> None:
    """A missing secret, an unreachable socket, a missing command: one line, no traceback."""
    env.put("prod/db", '{"password": "pw"}')
    cases = [
        (["--env", "X=secret://prod/nope", "--", "true"], 1, "prod/nope"),
        (
            ["--socket", str(tmp_path / "none.sock"), "--env", "X=secret://prod/db", "--", "true"],
            1,
            "cannot reach the agent",
        ),
        (["--env", "X=secret://prod/db#nokey", "--", "true"], 2, "no key 'nokey'"),
        (["--env", "X=secret://prod/db", "--", "/nonexistent/cmd"], 127, "command not found"),
    ]
    for argv, status, words in cases:
        code, _, err = env.cli("exec", *argv)
        assert code == status, (argv, err)
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("secrets-agent: "), err
        assert words in lines[0] and "Traceback" not in err


def test_an_unexpected_error_prints_one_line_and_the_traceback_only_with_debug(
    env: AgentEnv, monkeypatch: pytest.MonkeyPatch
) -> None:
    from agent.commands import secrets

    def broken(*_: object, **__: object) -> None:
        raise ZeroDivisionError("boom")

    monkeypatch.setattr(secrets, "load", broken)
    code, _, err = env.cli("list")
    assert code == 70 and len(err.strip().splitlines()) == 1
    assert "internal error (builtins.ZeroDivisionError)" in err and "--debug" in err
    code, _, err = env.cli("--debug", "list")
    assert code == 70 and "Traceback" in err and "boom" in err
