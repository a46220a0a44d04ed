"""The inner loop's guard (tests/support/inner_loop.py), in pytest sessions of its own: with
--max-unmarked-seconds, a test not marked slow that takes longer fails the run, named with its time;
a slow-marked one and a quick one do not; without the option nothing is measured. Setup counts when
the fixture is the test's own (function scope, or a wider one that no other test of the run uses).

The case of record is `make check`'s own limit, 2 s, against a 2.5 s test, and takes that long, so it
is marked slow itself. The same cases at a tenth of the scale keep the guard in the inner loop.
"""

from __future__ import annotations

import pytest

pytest_plugins = ["pytester"]

SCALES = [
    pytest.param(2.0, id="make-check-limit", marks=pytest.mark.slow),  # 2 s, against a 2.5 s test
    pytest.param(0.2, id="tenth"),
]


@pytest.fixture
def session(pytester: pytest.Pytester) -> pytest.Pytester:
    pytester.makeini("[pytest]\nmarkers =\n    slow: takes long\n")
    return pytester


def write_tests(pytester: pytest.Pytester, limit: float) -> None:
    over = limit * 1.25
    pytester.makepyfile(
        test_timed=f"""
        import time

        import pytest


        def test_quick():
            pass


        def test_over_the_limit():
            time.sleep({over})


        @pytest.mark.slow
        def test_marked_slow():
            time.sleep({over})


        @pytest.fixture(scope="module")
        def shared():
            time.sleep({over})  # made once, for both tests that use it


        def test_first_to_use_a_shared_fixture(shared):
            pass


        def test_second_to_use_a_shared_fixture(shared):
            pass


        @pytest.fixture(scope="module")
        def solo():
            time.sleep({over})  # module-scoped, but made for one test alone


        def test_alone_to_use_a_module_fixture(solo):
            pass


        @pytest.fixture
        def own():
            time.sleep({over / 2})


        def test_with_a_fixture_of_its_own(own):
            time.sleep({over / 2})
        """
    )


# Only the guard: the plugins the outer session has would cost each inner one a second (hypothesis).
QUIET = ("-p", "no:cacheprovider", "-p", "no:asyncio", "-p", "no:hypothesispytest", "-p", "no:cov")


def run(pytester: pytest.Pytester, *args: str) -> pytest.RunResult:
    return pytester.runpytest("-p", "support.inner_loop", *QUIET, *args)


@pytest.mark.parametrize("limit", SCALES)
def test_a_test_over_the_limit_fails_the_run_by_name(session: pytest.Pytester, limit: float) -> None:
    write_tests(session, limit)
    result = run(session, "--max-unmarked-seconds", str(limit), "-k", "over_the_limit")
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.assert_outcomes(passed=1)  # the test itself passed: the run failed for its time
    result.stdout.re_match_lines(
        [
            rf".*1 not marked slow, over the inner loop's {limit:g} s: the run fails.*",
            r"test_timed\.py::test_over_the_limit took \d+\.\d\d s: mark it @pytest\.mark\.slow .*",
        ]
    )


@pytest.mark.parametrize("limit", SCALES)
def test_slow_marked_and_quick_tests_pass(session: pytest.Pytester, limit: float) -> None:
    write_tests(session, limit)
    result = run(session, "--max-unmarked-seconds", str(limit), "-k", "quick or marked_slow")
    assert result.ret == pytest.ExitCode.OK
    result.assert_outcomes(passed=2)
    result.stdout.no_fnmatch_line("*not marked slow*")


def test_a_shared_fixture_is_not_counted_but_a_fixture_of_its_own_is(session: pytest.Pytester) -> None:
    write_tests(session, 0.1)
    result = run(session, "--max-unmarked-seconds", "0.1", "-k", "fixture")
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.assert_outcomes(passed=4)
    result.stdout.fnmatch_lines(["*2 not marked slow*"])
    result.stdout.fnmatch_lines(["*::test_alone_to_use_a_module_fixture took *"], consecutive=False)
    result.stdout.fnmatch_lines(["*::test_with_a_fixture_of_its_own took *"], consecutive=False)
    result.stdout.no_fnmatch_line("*_to_use_a_shared_fixture took*")


def test_without_the_option_nothing_is_measured(session: pytest.Pytester) -> None:
    write_tests(session, 0.2)
    result = run(session, "-k", "over_the_limit")
    assert result.ret == pytest.ExitCode.OK
    result.stdout.no_fnmatch_line("*not marked slow*")
