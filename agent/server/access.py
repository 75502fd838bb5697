"""Access rules: which callers may read which secret names and stages.

Deny by default: a read is allowed only if a rule matches the caller *and*
the name *and* the stage. A rule matches

* a Unix-socket caller by ``uids`` or ``gids`` (primary or supplementary),
  and, if ``exe`` is given, also by the executable path (globs); an unknown
  executable never matches a rule that names one;
* a TCP caller by ``token`` (the token's name in ``listen.tcp.tokens``).

There is no implicit grant, not even to root or to the agent's own uid: the
default config carries one explicit rule for the agent's uid
(``agent.config._default_access``), so every grant is visible in the config.
Root can read the keyring and the agent's memory anyway; the rules do not
pretend otherwise (see ``docs/security.md``).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase

from agent.config import AccessRule
from agent.errors import BadRequest, ConfigError
from agent.server.peer import Caller
from agent.types import normalize_stage

#: A rule's ``stages`` entry that allows every stage, and versions with none.
ANY_STAGE = "*"


@dataclass(frozen=True, slots=True)
class Decision:
    """An access decision and, for the audit log, why (a rule index or a reason)."""

    allowed: bool
    reason: str


@dataclass(frozen=True, slots=True)
class _Rule:
    index: int
    secrets: tuple[str, ...]
    uids: frozenset[int]
    gids: frozenset[int]
    exe: tuple[str, ...]
    token: str | None
    stages: frozenset[str]

    @classmethod
    def of(cls, index: int, rule: AccessRule) -> _Rule:
        try:
            stages = frozenset(s if s == ANY_STAGE else normalize_stage(s) for s in rule.stages)
        except BadRequest as exc:
            raise ConfigError(exc.message, path=f"access[{index}].stages") from None
        return cls(
            index,
            tuple(rule.secrets),
            frozenset(rule.uids),
            frozenset(rule.gids),
            tuple(rule.exe),
            rule.token,
            stages,
        )

    def matches_caller(self, caller: Caller) -> bool:
        if caller.listener == "tcp":
            identified = self.token is not None and self.token == caller.token
        else:
            identified = caller.uid is not None and (
                caller.uid in self.uids or not self.gids.isdisjoint(caller.groups)
            )
        if not identified:
            return False
        if self.exe:
            exe = caller.exe
            return exe is not None and any(fnmatchcase(exe, pat) for pat in self.exe)
        return True

    def matches_name(self, name: str) -> bool:
        return any(fnmatchcase(name, pat) for pat in self.secrets)

    def allows(self, stages: set[str] | None) -> bool:
        if stages is None or ANY_STAGE in self.stages:
            return True
        return not self.stages.isdisjoint(stages)


#: Decisions remembered per policy before the memo starts again (bounds memory).
_MEMO_LIMIT = 65536


class AccessPolicy:
    """The ``access:`` rules of the config, compiled once.

    Decisions are remembered per (caller, name, stages): a read repeats the
    same question, and scanning every rule with ``fnmatch`` is the costly
    part. The memo lives and dies with the policy, which a config reload
    replaces, so a reload takes effect at once. The caller part of the key is
    :attr:`Caller.key` (listener, uid or token name, groups, executable), all
    a rule can look at.
    """

    def __init__(self, rules: Sequence[AccessRule]) -> None:
        self._rules = tuple(_Rule.of(i, rule) for i, rule in enumerate(rules))
        #: Some rule names gids: callers' supplementary groups are needed.
        self.needs_groups = any(r.gids for r in self._rules)
        #: Some rule names an executable: it is read again on every request.
        self.needs_exe = any(r.exe for r in self._rules)
        self._memo: dict[tuple[object, ...], Decision] = {}
        self._listable: dict[tuple[object, ...], bool] = {}

    def _matching(self, caller: Caller, name: str) -> Iterator[_Rule]:
        for rule in self._rules:
            if rule.matches_caller(caller) and rule.matches_name(name):
                yield rule

    def check(self, caller: Caller, name: str, stages: Iterable[str] | None = None) -> Decision:
        """May ``caller`` read ``name``, at one of ``stages``?

        ``stages=None`` checks the name alone; it is done before any lookup,
        so a denied read and a read of a missing secret answer alike. A read
        by version id passes the stages that version carries: one of them
        must be allowed, unless a rule allows ``"*"``.
        """
        key = (caller.key, name, None if stages is None else tuple(stages))
        decision = self._memo.get(key)
        if decision is None:
            decision = self._decide(caller, name, key[2])
            if len(self._memo) >= _MEMO_LIMIT:
                self._memo.clear()
            self._memo[key] = decision
        return decision

    def _decide(self, caller: Caller, name: str, stages: Iterable[str] | None) -> Decision:
        wanted = {normalize_stage(s) for s in stages} if stages is not None else None
        matched = False
        for rule in self._matching(caller, name):
            matched = True
            if rule.allows(wanted):
                return Decision(True, f"access[{rule.index}]")
        if matched:
            shown = ",".join(sorted(wanted or ())) or "no stage"
            return Decision(False, f"stage ({shown}) not allowed by any rule for this secret")
        return Decision(False, "no rule matches this caller and secret")

    def may_list(self, caller: Caller, name: str) -> bool:
        """Whether ``name`` appears in this caller's ``GET /v1/secrets`` and status."""
        key = (caller.key, name)
        listable = self._listable.get(key)
        if listable is None:
            listable = next(self._matching(caller, name), None) is not None
            if len(self._listable) >= _MEMO_LIMIT:
                self._listable.clear()
            self._listable[key] = listable
        return listable

    def has_grant(self, caller: Caller) -> bool:
        """Whether any rule names this caller at all (else it sees health only)."""
        return any(rule.matches_caller(caller) for rule in self._rules)
