"""Every recipe and snippet in README.md and docs/ is proven: the shell recipes run as written, twice
in a row, against a facade started the way the README starts one (``make serve``); the code snippets
are excerpts of programs the test suite builds and runs; the configuration snippets parse.

Each fenced block carries a marker on the line before its fence:

- ``<!-- runnable -->`` (shell only): run here, from the repository root, with bash -e, twice;
- ``<!-- from: PATH -->``: an excerpt of PATH, a file the suite builds or runs (``examples/``,
  ``clients/``, ``k8s/``): every non-blank line of the block, stripped, is a line of PATH, in the
  same order (a line ``...`` or ``// ...`` marks an elision);
- ``<!-- parsed -->``: a configuration fragment checked by its own language's parser here (YAML,
  PromQL with promtool, the credentials profile with the facade's own reader);
- ``<!-- layout -->``: the README's map of the repository: every path it names exists;
- ``<!-- not run: WHY -->``: what this machine cannot run (a cluster, a registry, the test command
  itself), and what proves it instead.

A block with none fails, so a new snippet is either proven here or says why it is not.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(\w*)\s*$")
SHELL = {"sh", "bash", "shell", "console"}
RUNNABLE = "<!-- runnable -->"
PARSED = "<!-- parsed -->"
LAYOUT = "<!-- layout -->"
FROM = re.compile(r"^<!-- from: (\S+) -->$")
NOT_RUN = re.compile(r"^<!-- not run: \S.* -->$")
ELISIONS = {"...", "// ..."}
# Excerpts must come from what the suite builds or runs, not from any file at all.
EXCERPTED = ("examples/", "clients/go/", "clients/java/src/", "clients/node/src/", "k8s/")
HEALTH = "http://127.0.0.1:8080/healthz"  # make serve's metrics port (README, "Two commands")
RUN_TIMEOUT = 240.0  # seconds: `make tools` may fetch buf from npm


class Block(NamedTuple):
    where: str  # path:line of the fence
    language: str  # the fence's info string
    marker: str  # the line before the fence
    text: str


def fenced_blocks() -> list[Block]:
    blocks = []
    for path in DOCUMENTS:
        lines = path.read_text().splitlines()
        index = 0
        while index < len(lines):
            opening = FENCE.match(lines[index])
            if opening:
                end = next(i for i in range(index + 1, len(lines)) if lines[i].startswith("```"))
                marker = lines[index - 1].strip() if index else ""
                where = f"{path.relative_to(ROOT)}:{index + 1}"
                text = "\n".join(lines[index + 1 : end]) + "\n"
                blocks.append(Block(where, opening[1], marker, text))
                index = end
            index += 1
    return blocks


BLOCKS = fenced_blocks()
RUNNABLE_BLOCKS = [block for block in BLOCKS if block.marker == RUNNABLE]
EXCERPTS = [block for block in BLOCKS if FROM.match(block.marker)]
PARSED_BLOCKS = [block for block in BLOCKS if block.marker == PARSED]
LAYOUTS = [block for block in BLOCKS if block.marker == LAYOUT]


def test_every_block_is_proven_here_or_says_why_not() -> None:
    unmarked = [
        f"{block.where} ({block.language or 'no language'})"
        for block in BLOCKS
        if block not in RUNNABLE_BLOCKS + EXCERPTS + PARSED_BLOCKS + LAYOUTS
        and not NOT_RUN.match(block.marker)
    ]
    assert not unmarked, (
        f"mark each {RUNNABLE}, <!-- from: PATH -->, {PARSED}, {LAYOUT} or <!-- not run: why -->: {unmarked}"
    )
    assert all(block.language in SHELL for block in RUNNABLE_BLOCKS), "only shell recipes are run"
    # The README's own recipes for a new user are among those run.
    assert sum(block.where.startswith("README.md") for block in RUNNABLE_BLOCKS) >= 3


def missing_from(excerpt: str, source: str) -> list[str]:
    """The excerpt's lines not found in ``source`` in order (stripped; blanks and elisions skipped)."""
    lines = iter(line.strip() for line in source.splitlines())
    missing = []
    for wanted in (line.strip() for line in excerpt.splitlines()):
        if not wanted or wanted in ELISIONS:
            continue
        if not any(line == wanted for line in lines):  # advances the iterator: order is kept
            missing.append(wanted)
            lines = iter(line.strip() for line in source.splitlines())  # report every missing line
    return missing


def test_an_excerpt_check_can_fail() -> None:
    source = "a\n  b\nc\n"
    assert missing_from("a\n...\nc\n", source) == []
    assert missing_from("c\na\n", source) == ["a"]  # out of order
    assert missing_from("b\nd\n", source) == ["d"]


@pytest.mark.parametrize("block", EXCERPTS, ids=[block.where for block in EXCERPTS])
def test_the_snippet_is_an_excerpt_of_a_tested_file(block: Block) -> None:
    match = FROM.match(block.marker)
    assert match is not None
    path = match[1]
    assert path.startswith(EXCERPTED), f"{block.where}: {path} is not among what the suite builds or runs"
    missing = missing_from(block.text, (ROOT / path).read_text())
    assert not missing, f"{block.where}: not in {path} (in this order): {missing}"


def parse(block: Block, tmp_path: Path) -> None:
    if block.language == "yaml":
        documents = [document for document in yaml.safe_load_all(block.text) if document is not None]
        assert documents and all(isinstance(document, (dict, list)) for document in documents)
    elif block.language == "ini":
        from tiw_facade.credentials import parse_profile

        parse_profile(block.text)
    elif block.language == "promql":
        promtool = shutil.which("promtool")
        if promtool is None:
            pytest.fail("promtool is installed by `make test` (scripts/install-tools --test)")
        queries: list[str] = []  # one per line; an indented line continues the one before
        for line in block.text.splitlines():
            if line.strip() and not line.startswith("#"):
                if line[0].isspace() and queries:
                    queries[-1] += " " + line.strip()
                else:
                    queries.append(line)
        rules = [{"record": f"docs:query_{index}", "expr": query} for index, query in enumerate(queries)]
        path = tmp_path / "queries.yaml"
        path.write_text(yaml.safe_dump({"groups": [{"name": "docs", "rules": rules}]}))
        result = subprocess.run(
            [promtool, "check", "rules", str(path)], capture_output=True, text=True, check=False
        )
        assert result.returncode == 0, result.stdout + result.stderr
    else:
        pytest.fail(f"no parser here for {block.language!r}: prove it another way")


def named_paths(layout: str) -> list[str]:
    """The paths a layout names: each line's first word (words ending in a comma list more); an
    indented name is inside the last unindented one (``service/tiw_facade``)."""
    paths, parent = [], ""
    for line in layout.splitlines():
        if not line.strip():
            continue
        words = iter(line.split())
        names = [next(words)]
        while names[-1].endswith(","):  # "Dockerfile, k8s/"
            names[-1] = names[-1].rstrip(",")
            names.append(next(words))
        if line[0].isspace():
            paths += [f"{parent}/{name}" for name in names]
        else:
            parent = names[0].rstrip("/")
            paths += names
    return paths


def test_the_layout_names_only_what_exists() -> None:
    assert LAYOUTS, "the README's layout is marked"
    for block in LAYOUTS:
        paths = named_paths(block.text)
        assert len(paths) > 20, paths  # the parse found the map
        missing = [path for path in paths if not (ROOT / path).exists()]
        assert not missing, f"{block.where} names what does not exist: {missing}"
    packaged = {
        path.name for path in (ROOT / "service/tiw_facade").iterdir() if not path.name.startswith("_")
    }
    named = {path.rstrip("/").split("/")[-1] for path in named_paths(LAYOUTS[0].text)}
    unnamed = sorted(name for name in packaged - named if name not in {"py.typed"})
    assert not unnamed, f"the README's layout leaves out: {unnamed}"


@pytest.mark.parametrize("block", PARSED_BLOCKS, ids=[block.where for block in PARSED_BLOCKS])
def test_the_configuration_snippet_parses(block: Block, tmp_path: Path) -> None:
    parse(block, tmp_path)


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
