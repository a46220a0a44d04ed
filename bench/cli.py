"""``python -m bench [--quick] [--only SUITES] [--profile] [--output FILE]``.

SUITES: comma-separated, of overhead, quota, fairness, failover, local, answers, callbacks (all by
default).
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from bench import answers, callbacks, failover, fairness, local, overhead, profiling, quota, report
from bench.common import Budget, Section
from bench.procs import ROOT, BenchError, Processes

SUITES: dict[str, Callable[[Processes, Budget], Section]] = {
    "overhead": overhead.run,
    "quota": quota.run,
    "fairness": fairness.run,
    "failover": failover.run,
    "local": local.run,
    "answers": answers.run,
    "callbacks": callbacks.run,
}
BENCH_DIR = Path(__file__).resolve().parent
FULL_OUTPUT = BENCH_DIR / "RESULTS.md"
PARTIAL_OUTPUT = BENCH_DIR / "RESULTS-partial.md"


def _suites(raw: str) -> list[str]:
    names = [name.strip() for name in raw.split(",") if name.strip()]
    unknown = [name for name in names if name not in SUITES]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"choose from {', '.join(SUITES)} (comma-separated)")
    return names


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a smoke run: fewer, shorter rounds (each suite still starts its processes)",
    )
    parser.add_argument(
        "--only", type=_suites, metavar="SUITES", help=f"run only these, comma-separated: {', '.join(SUITES)}"
    )
    parser.add_argument(
        "--profile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="profile the facade with cProfile (default: in a full run, only when an overhead or "
        "local-path goal is missed)",
    )
    parser.add_argument(
        "--output",
        type=Path,
        help=f"where to write the results (default: {FULL_OUTPUT.relative_to(ROOT)} for a full run, "
        f"else {PARTIAL_OUTPUT.relative_to(ROOT)})",
    )
    parser.add_argument(
        "--keep-logs", action="store_true", help="keep every process's log (printed at the end)"
    )
    return parser


def _command(argv: Sequence[str]) -> str:
    python = os.path.relpath(sys.executable, ROOT) if sys.executable.startswith(str(ROOT)) else sys.executable
    return shlex.join([python, "-m", "bench", *argv])


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(args_list)
    budget = Budget.quick() if args.quick else Budget.full()
    names = args.only or list(SUITES)
    partial = args.quick or args.only is not None
    output: Path = args.output or (PARTIAL_OUTPUT if partial else FULL_OUTPUT)

    started = time.monotonic()
    load_before = os.getloadavg()
    sections: list[Section] = []
    try:
        with Processes(keep_logs=args.keep_logs) as procs:
            for name in names:
                print(f"bench: {name} ...", file=sys.stderr, flush=True)
                section = SUITES[name](procs, budget)
                sections.append(section)
                for goal in section.goals:
                    print(
                        f"bench:   {'met ' if goal.met else 'MISS'} {goal.name}: {goal.detail}",
                        file=sys.stderr,
                    )
            missed = any(
                not goal.met
                for s in sections
                if s.title.startswith(("Overhead", "Local"))
                for goal in s.goals
            )
            if args.profile or (args.profile is None and not partial and missed):
                print("bench: profiling the facade ...", file=sys.stderr, flush=True)
                sections.append(profiling.run(procs, budget))
    except BenchError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 1
    elapsed = time.monotonic() - started
    text = report.render(
        sections, _command(args_list), report.machine(load_before, os.getloadavg()), elapsed, partial
    )
    output.write_text(text)
    print(f"bench: wrote {output} in {elapsed:.0f} s", file=sys.stderr)
    return 0
