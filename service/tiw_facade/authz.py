"""Who may call what: the policy of TIW_AUTHZ_POLICY_FILE, kept current, asked once per call.

``Authorizer`` is what the server holds when a policy file is set (without one, the facade behaves
as before: nobody is refused). ``authorize(principal, method, sdk_app_id)`` gives a ``Verdict``: the
policy's ``Decision`` (authz_policy.py: gRFC A43's rules, deny first), and whether the call goes on.
In ``enforce`` mode a denied call stops there; in ``audit`` mode it goes on, and is counted as
``would_deny``, so that an operator sees what a policy would refuse before it refuses anything.

The file is polled (every TIW_CREDENTIALS_POLL seconds, as the credentials file) and a new version
taken into use whole: one reference swapped, so a call decided by the old policy is not touched,
and no call waits for or fails because of a swap. At start a malformed policy raises
``PolicyError``, which the CLI turns into a one-line error and exit status 2. At run time a
malformed (or unreadable) version keeps the last good policy in use, logs one ERROR line (the
problem, never the policy) and counts ``tiw_authz_policy_reload_failures_total``, once per version.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Final, Literal

from tiw_facade import secret_files
from tiw_facade.authz_parse import parse_policy
from tiw_facade.authz_policy import NO_RULE, OTHER_RULE, Decision, Policy, PolicyError
from tiw_facade.metrics import Metrics
from tiw_facade.secret_files import FileVersion

if TYPE_CHECKING:
    from tiw_facade.metrics import CounterValue
    from tiw_facade.settings import Settings

__all__ = [
    "MODES",
    "Authorizer",
    "AuthzConfig",
    "Decision",
    "DecisionCounter",
    "Policy",
    "PolicyError",
    "PolicyFile",
    "Verdict",
    "parse_policy",
]

log = logging.getLogger("tiw_facade.authz")

Mode = Literal["enforce", "audit"]
MODES: Final[tuple[Mode, ...]] = ("enforce", "audit")
# Distinct rule names tiw_authz_decisions_total gets as label values, over every policy this process
# loads; the rest count as `other`. A policy's rules are the operator's, but a reload a minute for a
# month must not grow the series without bound.
MAX_RULE_LABELS: Final = 100


@dataclasses.dataclass(frozen=True, slots=True)
class AuthzConfig:
    policy_file: str = ""  # TIW_AUTHZ_POLICY_FILE (empty: no policy, nobody refused)
    mode: Mode = "enforce"  # TIW_AUTHZ_MODE
    poll: float = 1.0  # TIW_CREDENTIALS_POLL: seconds between looks at the file

    @property
    def enabled(self) -> bool:
        return bool(self.policy_file)

    @classmethod
    def from_settings(cls, settings: Settings) -> AuthzConfig:
        mode: Mode = "audit" if settings.authz_mode == "audit" else "enforce"
        return cls(policy_file=settings.authz_policy_file, mode=mode, poll=settings.credentials_poll)


@dataclasses.dataclass(frozen=True, slots=True)
class Verdict:
    """The policy's decision on one call, and what the mode makes of it."""

    decision: Decision
    proceed: bool  # the call goes on: allowed, or denied in audit mode
    outcome: Literal["allow", "deny", "would_deny"]  # the metric's decision label

    @property
    def refused(self) -> bool:
        return not self.proceed


# --- the metric ------------------------------------------------------------------------------------


class DecisionCounter:
    """``tiw_authz_decisions_total{decision, rule}``, its series bound on first use and kept; rule
    names past MAX_RULE_LABELS count as ``other``."""

    def __init__(self, metrics: Metrics) -> None:
        self._counter = metrics.authz_decisions
        self._series: dict[tuple[str, str], CounterValue] = {}
        self._rules: set[str] = set()

    def series(self, outcome: str, rule: str) -> CounterValue:
        found = self._series.get((outcome, rule))
        if found is None:
            if rule in self._rules or rule in (NO_RULE, OTHER_RULE):
                found = self._series[outcome, rule] = self._counter.labels(outcome, rule)
            elif len(self._rules) < MAX_RULE_LABELS:
                self._rules.add(rule)
                found = self._series[outcome, rule] = self._counter.labels(outcome, rule)
            else:  # not remembered by its name: the names past the bound are as many as reloads make
                found = self.series(outcome, OTHER_RULE)
        return found


# --- the file --------------------------------------------------------------------------------------


def _load(path: str, methods: tuple[str, ...] | None) -> tuple[FileVersion, Policy]:
    """The file's version and policy, or ``PolicyError``; in a worker thread (reading, parsing)."""
    try:
        version, text = secret_files.read(path)  # a regular file, of at most 64 KiB, never blocking
    except secret_files.Unreadable as exc:
        raise PolicyError(str(exc)) from None
    return version, parse_policy(text, filename=path, methods=methods)


class PolicyFile(secret_files.WatchedFile[Policy]):
    """The policy of a file, polled for a new version; the last good one serves until a new one
    is valid."""

    unusable = (PolicyError,)

    def __init__(
        self,
        path: str,
        *,
        poll: float,
        metrics: Metrics,
        methods: Iterable[str] | None = None,
        on_change: Callable[[Policy], None] | None = None,
    ) -> None:
        super().__init__(path, poll=poll, name="authz-policy-watch")
        self._metrics = metrics
        self._methods = tuple(methods) if methods is not None else None
        self._on_change = on_change
        self._policy: Policy | None = None

    @property
    def policy(self) -> Policy:
        if self._policy is None:
            raise PolicyError("the policy file was not read yet (start() not awaited)")
        return self._policy

    def _load(self) -> tuple[FileVersion, Policy]:
        return _load(self.path, self._methods)

    def _adopt(self, policy: Policy, *, first: bool) -> None:
        if self._on_change is not None:
            self._on_change(policy)  # its series exist before the first decision under it
        self._policy = policy
        log.info(
            "authorization policy in use"
            if first
            else "authorization policy file changed: the new policy is in use",
            extra={"policy_file": self.path, "policy": policy.name, "rules": _counts(policy)},
        )

    def _refused(self, why: str) -> None:
        self._metrics.authz_policy_reload_failures.inc()
        log.error(
            "authorization policy file ignored: the last good policy stays in use",
            extra={"policy_file": self.path, "error": why},
        )


def _counts(policy: Policy) -> str:
    return f"{len(policy.deny_rules)} deny, {len(policy.allow_rules)} allow"


# --- the decisions ---------------------------------------------------------------------------------


class Authorizer:
    """The policy file and the mode: ``authorize`` once per call, on the event loop."""

    def __init__(
        self, config: AuthzConfig, metrics: Metrics, *, methods: Iterable[str] | None = None
    ) -> None:
        if not config.enabled:
            raise ValueError("no policy file: the server needs no Authorizer")
        self.mode: Mode = config.mode
        self._denied: Literal["deny", "would_deny"] = "would_deny" if config.mode == "audit" else "deny"
        self._counter = DecisionCounter(metrics)
        # The policy in use, and the verdict and series of each decision it can give: one tuple,
        # replaced whole when the file changes.
        self._current: tuple[Policy, dict[Decision, tuple[Verdict, CounterValue]]] | None = None
        self.file = PolicyFile(
            config.policy_file, poll=config.poll, metrics=metrics, methods=methods, on_change=self._adopt
        )

    async def start(self) -> None:
        await self.file.start()

    async def aclose(self) -> None:
        await self.file.aclose()

    @property
    def policy(self) -> Policy:
        return self.file.policy

    def _adopt(self, policy: Policy) -> None:
        """Make the verdicts of ``policy`` (and so its series, at 0) before it decides a call."""
        verdicts: dict[Decision, tuple[Verdict, CounterValue]] = {}
        for decision in policy.decisions:
            outcome = "allow" if decision.allowed else self._denied
            verdict = Verdict(decision, proceed=outcome != "deny", outcome=outcome)
            verdicts[decision] = (verdict, self._counter.series(outcome, decision.label))
        self._current = (policy, verdicts)

    def authorize(self, principal: str | None, method: str, sdk_app_id: int | None) -> Verdict:
        """The verdict on a call by ``principal`` (None: no proven identity) of ``method`` (the full
        name, ``/tiw.v20190919.TiwService/StopWhiteboardPush``) for ``sdk_app_id`` (None: unknown),
        under the policy in use when it began; counted."""
        if self._current is None:
            raise PolicyError("the policy file was not read yet (start() not awaited)")
        policy, verdicts = self._current
        verdict, series = verdicts[policy.decide(principal, method, sdk_app_id)]
        series.inc()
        return verdict
