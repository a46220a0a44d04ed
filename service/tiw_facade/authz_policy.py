"""The authorization policy, compiled: what a call's principal, method and SdkAppId come to.

A policy (gRFC A43, "SDK authorization", with one extension) is deny rules and allow rules: a call
is denied when a deny rule matches it, else allowed when an allow rule does, else denied. A rule
matches when every part it states matches (its principals, its paths, its SdkAppIds); a part left
out matches anything. Within a list, the first rule that matches decides.

Patterns, in principals and paths, as A43 (and grpc-go, grpc-java) read them: ``"*"`` matches any
value that is not empty, ``"abc*"`` a value starting with ``abc``, ``"*abc"`` one ending with it,
anything else only itself. A caller that proved no identity has the empty principal: only a rule
without ``source``, or the exact principal ``""``, matches it; ``"*"`` is every *proven* caller, as
A43 says ("will match when the value is not empty").

``request.sdk_app_ids`` is this facade's extension: the SdkAppIds the rule covers. A call whose
SdkAppId is unknown (a method without one) is covered by a deny rule's list and by no allow rule's:
when in doubt, the rule that denies applies.

authz_parse.py reads a policy (JSON or YAML) into a ``Policy``; ``decide`` is all a call costs: a
decision is kept for the next call of the same caller, method and SdkAppId; the rules whose paths
cover a method are found once; each pattern list is a set and two tuples that ``str`` tests natively.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from typing import Final, Literal

__all__ = [
    "MAX_CACHED_DECISIONS",
    "MAX_CACHED_METHODS",
    "NO_RULE",
    "OTHER_RULE",
    "Decision",
    "Patterns",
    "Policy",
    "PolicyError",
    "Rule",
]

# The metric's own label values (authz.DecisionCounter), which no rule may be named.
NO_RULE: Final = "none"  # denied because no allow rule matched
OTHER_RULE: Final = "other"  # a rule name beyond the metric's bound on label values
# Distinct methods whose matching rules are kept: the served methods, many times over. A caller
# naming ever new methods costs a scan of the rules per call, never memory.
MAX_CACHED_METHODS: Final = 256
# Decisions kept, by (principal, method, SdkAppId): a policy of a hundred rules takes 20 µs to scan,
# a kept decision 0.2 µs. The callers, methods and SdkAppIds a facade sees are far fewer; when they
# are not (a caller trying every SdkAppId), the decisions are forgotten and made again, at most a
# scan each: a few hundred KiB at most.
MAX_CACHED_DECISIONS: Final = 1024


class PolicyError(ValueError):
    """The policy cannot be used; the message is one line naming the rule and the field."""


@dataclasses.dataclass(frozen=True, slots=True)
class Decision:
    """What the policy says of one call."""

    allowed: bool
    rule: str | None  # the deciding rule's name; None: denied because no allow rule matched
    matched: Literal["deny", "allow"] | None  # the list the rule is in

    @property
    def label(self) -> str:
        """The rule as the metric's label names it."""
        return self.rule if self.rule is not None else NO_RULE

    @property
    def explanation(self) -> str:
        """In words, for a status or a log line (never the policy's content)."""
        if self.rule is None:
            return "no allow rule matched"
        verb = "allowed" if self.allowed else "denied"
        return f'{verb} by rule "{self.rule}"'


NO_ALLOW_RULE_MATCHED: Final = Decision(allowed=False, rule=None, matched=None)


class Patterns:
    """A list of A43 patterns, compiled into the three tests str does fastest."""

    __slots__ = ("exact", "prefixes", "present", "suffixes")

    def __init__(self, patterns: Iterable[str]) -> None:
        exact: set[str] = set()
        prefixes: list[str] = []
        suffixes: list[str] = []
        self.present = False
        for pattern in patterns:
            if pattern == "*":
                self.present = True
            elif pattern.endswith("*"):
                prefixes.append(pattern[:-1])
            elif pattern.startswith("*"):
                suffixes.append(pattern[1:])
            else:
                exact.add(pattern)
        self.exact = frozenset(exact)
        self.prefixes = tuple(prefixes)
        self.suffixes = tuple(suffixes)

    def match(self, value: str) -> bool:
        return (
            value in self.exact
            or (self.present and value != "")
            or value.startswith(self.prefixes)  # False for an empty tuple
            or value.endswith(self.suffixes)
        )


class Rule:
    """One rule, compiled; its ``decision`` made once, since every call it decides gets the same."""

    __slots__ = ("decision", "name", "paths", "principals", "sdk_app_ids")

    def __init__(
        self,
        name: str,
        kind: Literal["deny", "allow"],
        principals: Patterns | None,
        paths: Patterns | None,
        sdk_app_ids: frozenset[int] | None,
    ) -> None:
        self.name = name
        self.principals = principals  # None: any caller, proven or not
        self.paths = paths  # None: any method
        self.sdk_app_ids = sdk_app_ids  # None: any SdkAppId
        self.decision = Decision(allowed=kind == "allow", rule=name, matched=kind)

    def covers_method(self, method: str) -> bool:
        return self.paths is None or self.paths.match(method)

    def covers_caller(self, principal: str, sdk_app_id: int | None) -> bool:
        if self.principals is not None and not self.principals.match(principal):
            return False
        if self.sdk_app_ids is None:
            return True
        if sdk_app_id is None:  # unknown: the deny rule applies, the allow rule does not
            return not self.decision.allowed
        return sdk_app_id in self.sdk_app_ids


class Policy:
    """A checked, compiled policy; ``decide`` is what every call asks."""

    def __init__(self, name: str, deny: Sequence[Rule], allow: Sequence[Rule]) -> None:
        self.name = name
        self._deny = tuple(deny)
        self._allow = tuple(allow)
        # method -> the rules whose paths cover it: a decision scans only those.
        self._by_method: dict[str, tuple[tuple[Rule, ...], tuple[Rule, ...]]] = {}
        self._decided: dict[tuple[str | None, str, int | None], Decision] = {}

    @property
    def deny_rules(self) -> tuple[str, ...]:
        return tuple(rule.name for rule in self._deny)

    @property
    def allow_rules(self) -> tuple[str, ...]:
        return tuple(rule.name for rule in self._allow)

    @property
    def decisions(self) -> tuple[Decision, ...]:
        """Every decision ``decide`` can give (each rule's, and no allow rule's)."""
        return (*(rule.decision for rule in (*self._deny, *self._allow)), NO_ALLOW_RULE_MATCHED)

    def decide(self, principal: str | None, method: str, sdk_app_id: int | None) -> Decision:
        """Deny rules first, then allow rules, then denied. ``principal`` None: not proven;
        ``method`` the full name, ``/package.Service/Method``; ``sdk_app_id`` None: unknown."""
        key = (principal, method, sdk_app_id)
        decision = self._decided.get(key)
        if decision is None:
            decision = self._scan(principal or "", method, sdk_app_id)
            if len(self._decided) >= MAX_CACHED_DECISIONS:
                self._decided.clear()
            self._decided[key] = decision
        return decision

    def _scan(self, principal: str, method: str, sdk_app_id: int | None) -> Decision:
        rules = self._by_method.get(method)
        if rules is None:
            rules = self._rules_of(method)
        for rule in rules[0]:
            if rule.covers_caller(principal, sdk_app_id):
                return rule.decision
        for rule in rules[1]:
            if rule.covers_caller(principal, sdk_app_id):
                return rule.decision
        return NO_ALLOW_RULE_MATCHED

    def _rules_of(self, method: str) -> tuple[tuple[Rule, ...], tuple[Rule, ...]]:
        rules = (
            tuple(rule for rule in self._deny if rule.covers_method(method)),
            tuple(rule for rule in self._allow if rule.covers_method(method)),
        )
        if len(self._by_method) < MAX_CACHED_METHODS:
            self._by_method[method] = rules  # one dict write: atomic under the GIL
        return rules
