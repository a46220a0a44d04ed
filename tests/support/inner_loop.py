"""The inner loop's guard: `make check` fails when a test not marked slow takes too long.

`scripts/check --quick` (what `make check` runs) passes ``--max-unmarked-seconds 2``. Without the
option nothing is measured: the full run (`make test`, CI on shared and noisy machines) never fails
for time. A test's time is its call, plus its setup less the fixtures it shares with other tests of the run
(module, package or session scope, used by more than one test: made once, by whichever test happens
to come first). A wider fixture that only this test uses counts as its own. Teardown is not
counted.

A plugin of its own (tests/conftest.py takes its hooks) so that a pytester session can load it
alone: ``-p support.inner_loop``.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Generator

import pytest

OPTION = "--max-unmarked-seconds"


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        OPTION,
        type=float,
        default=None,
        metavar="SECONDS",
        help="fail the run when a test not marked slow takes longer than this (its call, and its "
        "setup less shared fixtures); `make check` sets 2, the full run nothing",
    )


def pytest_configure(config: pytest.Config) -> None:
    limit: float | None = config.getoption("max_unmarked_seconds")
    if limit is not None:
        config.pluginmanager.register(Guard(limit), "inner-loop-guard")


class Guard:
    def __init__(self, limit: float) -> None:
        self.limit = limit
        self.offenders: list[tuple[str, float]] = []
        self._shared = 0.0  # seconds spent making shared fixtures in the current phase
        self._depth = 0  # shared fixtures being made (one may request another)
        self._own_setup = 0.0
        self._users: collections.Counter[int] = collections.Counter()  # tests of the run, by fixture

    def pytest_collection_finish(self, session: pytest.Session) -> None:
        for item in session.items:
            info = getattr(item, "_fixtureinfo", None)  # pytest.Function's; the definitions it uses
            for definitions in info.name2fixturedefs.values() if info is not None else ():
                self._users[id(definitions[-1])] += 1

    @pytest.hookimpl(wrapper=True)
    def pytest_fixture_setup(self, fixturedef: pytest.FixtureDef[object]) -> Generator[None, object, object]:
        if fixturedef.scope == "function" or self._users[id(fixturedef)] < 2 or self._depth:
            return (yield)
        self._depth += 1
        started = time.perf_counter()
        try:
            return (yield)
        finally:
            self._depth -= 1
            if not self._depth:
                self._shared += time.perf_counter() - started

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_makereport(
        self, item: pytest.Item, call: pytest.CallInfo[None]
    ) -> Generator[None, pytest.TestReport, pytest.TestReport]:
        report = yield
        own = max(0.0, report.duration - self._shared)
        self._shared = 0.0
        if report.when == "setup":
            self._own_setup = own
        elif report.when == "call":
            seconds = self._own_setup + own
            if seconds > self.limit and not report.skipped and item.get_closest_marker("slow") is None:
                self.offenders.append((item.nodeid, seconds))
        return report

    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        if self.offenders and session.exitstatus == pytest.ExitCode.OK:
            session.exitstatus = pytest.ExitCode.TESTS_FAILED

    def pytest_terminal_summary(self, terminalreporter: pytest.TerminalReporter) -> None:
        if not self.offenders:
            return
        terminalreporter.write_sep(
            "=",
            f"{len(self.offenders)} not marked slow, over the inner loop's {self.limit:g} s: the run fails",
            red=True,
        )
        for nodeid, seconds in self.offenders:
            terminalreporter.write_line(
                f"{nodeid} took {seconds:.2f} s: mark it @pytest.mark.slow (left to `make test`) "
                "or make it quicker"
            )
