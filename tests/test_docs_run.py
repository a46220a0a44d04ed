"""Every shell recipe in README.md and docs/ runs as written, twice in a row, against a facade
started the way the README starts one (``make serve``).

Each ```sh block carries a marker on the line before its fence: ``<!-- runnable -->`` (run here, from
the repository root, with bash -e, twice), or ``<!-- not run: WHY -->`` (a recipe this machine
cannot run: a cluster, a registry, the test command itself). A block with neither fails, so a new
recipe is either proven here or says why it is not.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SHELL_FENCE = re.compile(r"^```(?:sh|bash|shell|console)\s*$")
RUNNABLE = "<!-- runnable -->"
NOT_RUN = re.compile(r"^<!-- not run: \S.* -->$")
HEALTH = "http://127.0.0.1:8080/healthz"  # make serve's metrics port (README, "Two commands")
RUN_TIMEOUT = 240.0  # seconds: `make tools` may fetch buf from npm


class Block(NamedTuple):
    where: str  # path:line of the fence
    marker: str  # the line before the fence
    text: str


def shell_blocks() -> list[Block]:
    blocks = []
    for path in DOCUMENTS:
        lines = path.read_text().splitlines()
        index = 0
        while index < len(lines):
            if SHELL_FENCE.match(lines[index]):
                end = next(i for i in range(index + 1, len(lines)) if lines[i].startswith("```"))
                marker = lines[index - 1].strip() if index else ""
                where = f"{path.relative_to(ROOT)}:{index + 1}"
                blocks.append(Block(where, marker, "\n".join(lines[index + 1 : end]) + "\n"))
                index = end
            index += 1
    return blocks


BLOCKS = shell_blocks()
RUNNABLE_BLOCKS = [block for block in BLOCKS if block.marker == RUNNABLE]


def test_every_shell_block_is_run_here_or_says_why_not() -> None:
    unmarked = [
        block.where for block in BLOCKS if block.marker != RUNNABLE and not NOT_RUN.match(block.marker)
    ]
    assert not unmarked, f"mark each with {RUNNABLE} or <!-- not run: why -->: {unmarked}"
    # The README's own recipes for a new user are among those run.
    assert sum(block.where.startswith("README.md") for block in RUNNABLE_BLOCKS) >= 3


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """``make serve``, as the README says, until its health endpoint answers; stopped with SIGTERM."""
    try:
        urllib.request.urlopen(HEALTH, timeout=1).close()
    except OSError:
        pass
    else:
        pytest.fail(f"something already answers {HEALTH}: the README's ports must be free for this test")
    log = tmp_path_factory.mktemp("serve") / "make-serve.log"
    with log.open("wb") as out:  # a file, not a pipe: a pipe nobody reads would stall its logging
        process = subprocess.Popen(
            ["make", "serve"], cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(HEALTH, timeout=1).close()
                break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"make serve did not come up: {log.read_text()[-2000:]}")
                time.sleep(0.2)
        yield
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


@pytest.mark.slow
@pytest.mark.parametrize("block", RUNNABLE_BLOCKS, ids=[block.where for block in RUNNABLE_BLOCKS])
def test_the_recipe_runs_as_written_twice(block: Block, served: None) -> None:
    for attempt in ("first", "second"):
        result = subprocess.run(
            ["bash", "-e", "-o", "pipefail", "-c", block.text],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=RUN_TIMEOUT,
            check=False,
        )
        assert result.returncode == 0, (
            f"{block.where}, {attempt} run: exit {result.returncode}\n{block.text}\n"
            f"stdout: {result.stdout[-2000:]}\nstderr: {result.stderr[-2000:]}"
        )
