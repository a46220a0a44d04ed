"""RESULTS.md: which goals were met, with the numbers, the command, and the machine."""

from __future__ import annotations

import datetime
import importlib.metadata
import os
import platform
import subprocess
from collections.abc import Sequence

from bench.common import Section, table
from bench.procs import REDIS_SERVER, ROOT

PACKAGES = (
    "grpcio",
    "protobuf",
    "aiohttp",
    "uvloop",
    "redis",
    "prometheus-client",
    "tencentcloud-sdk-python-common",
    "tencentcloud-sdk-python-tiw",
    "requests",
)


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _output(*argv: str) -> str:
    try:
        return subprocess.run(
            argv, check=False, cwd=ROOT, capture_output=True, text=True, timeout=10
        ).stdout.strip()
    except OSError:
        return ""


def machine(load_before: Sequence[float], load_after: Sequence[float]) -> str:
    versions = ", ".join(f"{name} {_version(name)}" for name in PACKAGES)
    redis = _output(REDIS_SERVER, "--version").split(" sha=")[0] or "not found"
    commit = _output("git", "rev-parse", "--short", "HEAD") or "unknown"
    dirty = (
        " (with uncommitted changes)"
        if _output("git", "status", "--porcelain", "--untracked-files=no")
        else ""
    )
    return f"""\
- date: {datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")}
- `nproc`: {len(os.sched_getaffinity(0))}; CPU: {cpu_model()}; {platform.system()} {platform.release()}
- load average (1 min) at start / end: {load_before[0]:.2f} / {load_after[0]:.2f} (other work on the machine
  shows here)
- Python {platform.python_version()}; {versions}; {redis}
- commit {commit}{dirty}"""


def render(
    sections: Sequence[Section], command: str, machine_text: str, elapsed: float, partial: bool
) -> str:
    goals = [goal for section in sections for goal in section.goals]
    met = sum(goal.met for goal in goals)
    summary = table(
        ["goal", "met?", "numbers"],
        [[goal.name, "**yes**" if goal.met else "**NO**", goal.detail] for goal in goals],
    )
    missed = [goal.name for goal in goals if not goal.met]
    verdict = (
        f"All {len(goals)} goals met."
        if not missed
        else f"{met} of {len(goals)} goals met. Missed: " + "; ".join(missed) + "."
    )
    parts = [
        "# tiw-facade benchmark results",
        "",
        "Written by `bench/` (`make bench`); do not edit by hand."
        + (
            " **A partial run** (`--quick` or `--only`): see the full run for the figures of record."
            if partial
            else ""
        ),
        "",
        f"Command: `{command}` ({elapsed / 60:.1f} min)",
        "",
        machine_text,
        "",
        "Every figure is a ratio against a baseline measured in the same run, on the same machine, from",
        "rounds interleaved between the paths compared (medians). Each role — TIW emulator, facade(s),",
        "echo server, load generator, redis-server — is its own OS process, on loopback.",
        "",
        "## Goals",
        "",
        verdict,
        "",
        summary,
    ]
    for section in sections:
        parts += ["", f"## {section.title}", "", section.body.rstrip()]
    return "\n".join(parts) + "\n"
