"""Access rules: deny by default; uids, gids, exe globs, tokens; stages."""

from __future__ import annotations

from typing import Any

import pytest

from agent.config import AccessRule
from agent.errors import ConfigError
from agent.server.access import AccessPolicy
from agent.server.peer import Caller


def policy(*rules: dict[str, Any]) -> AccessPolicy:
    return AccessPolicy([AccessRule(**r) for r in rules])


def unix(
    uid: int = 1000, gid: int = 1000, groups: tuple[int, ...] = (), exe: str | None = None
) -> Caller:
    return Caller("unix", uid=uid, gid=gid, pid=42, groups=frozenset({gid, *groups}), exe=exe)


def test_no_rules_deny_everyone_including_root() -> None:
    empty = policy()
    for caller in (unix(0, 0), unix(), Caller("tcp", token="app")):
        decision = empty.check(caller, "app/db")
        assert not decision.allowed
        assert decision.reason == "no rule matches this caller and secret"


def test_a_uid_rule_allows_that_uid_and_the_names_it_globs() -> None:
    p = policy({"secrets": ["app/*"], "uids": [1000]})
    assert p.check(unix(1000), "app/db").allowed
    assert p.check(unix(1000), "app/db").reason == "access[0]"
    assert not p.check(unix(1001), "app/db").allowed
    assert not p.check(unix(1000), "other/db").allowed


def test_gid_rules_match_primary_and_supplementary_groups() -> None:
    p = policy({"secrets": ["*"], "gids": [500]})
    assert p.check(unix(1000, gid=500), "x").allowed
    assert p.check(unix(1000, gid=1000, groups=(500,)), "x").allowed
    assert not p.check(unix(1000, gid=1000, groups=(501,)), "x").allowed


def test_exe_globs_narrow_a_rule_and_an_unknown_exe_fails_closed() -> None:
    p = policy({"secrets": ["*"], "uids": [1000], "exe": ["/usr/bin/python3*", "/opt/app/bin/*"]})
    assert p.check(unix(exe="/usr/bin/python3.11"), "x").allowed
    assert p.check(unix(exe="/opt/app/bin/server"), "x").allowed
    assert not p.check(unix(exe="/usr/bin/curl"), "x").allowed
    assert not p.check(unix(exe=None), "x").allowed


def test_token_rules_match_only_tcp_callers_with_that_token() -> None:
    p = policy({"secrets": ["app/*"], "token": "app"}, {"secrets": ["*"], "uids": [1000]})
    assert p.check(Caller("tcp", token="app"), "app/db").allowed
    assert not p.check(Caller("tcp", token="ci"), "app/db").allowed
    assert not p.check(Caller("tcp"), "app/db").allowed
    # uid rules never match a TCP caller, token rules never a Unix one.
    assert not p.check(Caller("tcp", token="app"), "other").allowed
    assert not p.check(unix(1001), "app/db").allowed


def test_default_stages_are_current_and_previous() -> None:
    p = policy({"secrets": ["*"], "uids": [1000]})
    assert p.check(unix(), "x", ["CURRENT"]).allowed
    assert p.check(unix(), "x", ["PREVIOUS"]).allowed
    assert p.check(unix(), "x", ["AWSPREVIOUS"]).allowed
    denied = p.check(unix(), "x", ["PENDING"])
    assert not denied.allowed
    assert "PENDING" in denied.reason


def test_a_version_is_allowed_if_one_of_its_stages_is() -> None:
    p = policy({"secrets": ["*"], "uids": [1000], "stages": ["AWSCURRENT"]})
    assert p.check(unix(), "x", ["CURRENT", "PENDING"]).allowed
    assert not p.check(unix(), "x", ["PREVIOUS"]).allowed
    assert not p.check(unix(), "x", []).allowed


def test_star_stage_allows_every_stage_and_unstaged_versions() -> None:
    p = policy({"secrets": ["*"], "uids": [1000], "stages": ["*"]})
    assert p.check(unix(), "x", ["PENDING"]).allowed
    assert p.check(unix(), "x", []).allowed


def test_later_rules_can_grant_what_earlier_ones_do_not() -> None:
    p = policy(
        {"secrets": ["*"], "uids": [1000], "stages": ["CURRENT"]},
        {"secrets": ["app/*"], "uids": [1000], "stages": ["PENDING"]},
    )
    decision = p.check(unix(), "app/db", ["PENDING"])
    assert decision.allowed and decision.reason == "access[1]"


def test_a_bad_stage_label_in_a_rule_is_a_config_error_naming_the_rule() -> None:
    with pytest.raises(ConfigError, match=r"access\[1\]\.stages"):
        policy({"secrets": ["*"], "uids": [1]}, {"secrets": ["*"], "uids": [1], "stages": ["a b"]})


def test_may_list_follows_name_matches() -> None:
    p = policy({"secrets": ["app/*"], "uids": [1000], "stages": ["PENDING"]})
    assert p.may_list(unix(), "app/db")
    assert not p.may_list(unix(), "other/db")
    assert not p.may_list(unix(1001), "app/db")


def test_caller_description_has_identity_but_no_token_value() -> None:
    assert unix(exe="/bin/x").describe() == {
        "listener": "unix",
        "uid": 1000,
        "gid": 1000,
        "pid": 42,
        "exe": "/bin/x",
    }
    assert Caller("tcp", token="app").describe() == {"listener": "tcp", "token": "app"}
