"""Schedules: slots, deterministic tokens, windows, cron; and the rotation config."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest
import yaml

from agent.config import parse_config
from agent.errors import ConfigError
from agent.rotation.schedule import Schedule


def ts(text: str) -> float:
    return datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp()


def test_every_cuts_time_into_epoch_aligned_slots_with_one_token_each() -> None:
    s = Schedule(every=30 * 86400)
    a = s.slot_at(ts("2026-12-01T10:00:00"))
    b = s.slot_at(ts("2026-12-02T23:00:00"))
    assert a == b and a.end - a.start == 30 * 86400 and a.start <= ts("2026-12-01T10:00:00")
    assert a.token("prod/db") == b.token("prod/db")  # every agent computes the same id
    assert a.token("prod/db") != a.token("prod/other")
    nxt = s.slot_at(a.end)
    assert nxt.start == a.end and nxt.token("prod/db") != a.token("prod/db")


def test_one_second_slots() -> None:
    s = Schedule(every=1)
    assert s.slot_at(100.2) == s.slot_at(100.9) != s.slot_at(101.0)


def test_cron_slots_run_from_one_firing_to_the_next() -> None:
    s = Schedule(cron="0 3 * * *")
    slot = s.slot_at(ts("2026-12-01T10:00:00"))
    assert slot.start == ts("2026-12-01T03:00:00") and slot.end == ts("2026-12-02T03:00:00")
    at_fire = s.slot_at(ts("2026-12-02T03:00:00"))
    assert at_fire.start == ts("2026-12-02T03:00:00")
    seconds = Schedule(cron="* * * * * */2")
    assert seconds.slot_at(ts("2026-12-01T10:00:03")).start == ts("2026-12-01T10:00:02")


def test_the_window_limits_when_a_rotation_may_start() -> None:
    s = Schedule(cron="0 3 * * *", window=2 * 3600)
    slot = s.slot_at(ts("2026-12-01T04:00:00"))
    assert s.in_window(slot, ts("2026-12-01T04:59:59"))
    assert not s.in_window(slot, ts("2026-12-01T05:00:00"))


def rule(**kw: object) -> dict[str, object]:
    return {"secret": "app/pw", "rotator": "random", **kw}


@pytest.mark.parametrize(
    ("rules", "message"),
    [
        ([rule()], "rotation[0]: give exactly one of 'every' (e.g. 30d) or 'cron'"),
        ([rule(every="1s", cron="* * * * *")], "give exactly one"),
        ([rule(every="500ms")], "rotation[0].every: the shortest rotation interval is 1s"),
        ([rule(cron="61 * * * *")], "rotation[0].cron: expected a cron expression"),
        ([rule(every="1d", rotator="lambda")], "rotation[0].rotator: unknown rotator 'lambda'"),
        ([rule(every="1d", params={"length": 2})], "rotation[0]: rotator 'random': params.length"),
        ([rule(every="1d", secret="../x")], "rotation[0].secret"),
        ([rule(every="1d"), rule(every="2d")], "rules 0 and 1 both rotate 'app/pw'"),
        ([rule(every="1d", window="0s")], "rotation[0].window"),
        ([rule(every="1d", rotator="command")], "params.command"),
    ],
)
def test_bad_rotation_rules_are_refused_naming_the_yaml_path(
    rules: list[dict[str, object]], message: str
) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config({"rotation": rules})
    assert message in info.value.message


def test_good_rules_parse() -> None:
    config = parse_config(
        {
            "rotation": [
                rule(every="30d"),
                {"secret": "b", "cron": "0 3 * * 1", "window": "2h", "rotator": "random"},
            ]
        }
    )
    assert config.rotation[0].every == 30 * 86400 and config.rotation[1].window == 7200
    assert config.rotation[0].flag_after_failures == 3


def test_the_rotation_example_in_config_agent_yaml_works_as_written(tmp_path: Path) -> None:
    """Uncommenting the example rules under ``rotation:`` gives a valid config."""
    text = (Path(__file__).resolve().parents[2] / "config" / "agent.yaml").read_text()
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("rotation:"))
    example = ["rotation:"]
    for line in lines[start + 1 :]:
        if not line.startswith("  # "):
            break
        example.append("  " + line[4:])
    doc = yaml.safe_load("\n".join(example))
    config = parse_config(doc, base_dir=tmp_path)
    assert [r.secret for r in config.rotation] == ["prod/db", "app/api-token"]
    assert config.rotation[0].every == 30 * 86400 and config.rotation[0].window == 7200
    assert config.rotation[1].cron == "0 4 1 * *"
