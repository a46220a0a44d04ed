"""The README stays true: its tables are the code's tables, its commands exist."""

from __future__ import annotations

import asyncio
import json
import pathlib
import re
import shlex
import sys

import yaml
from support.facade import Facade
from tiw_facade.errors import ERROR_TABLE
from tiw_facade.settings import markdown_table

ROOT = pathlib.Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def table_rows(heading: str) -> list[list[str]]:
    section = README.split(f"## {heading}\n", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("|")]
    header, _, *body = rows  # the first table of the section
    width = header.count("|")
    table: list[list[str]] = []
    for line in body:
        if line.count("|") != width:
            break
        table.append([cell.strip().strip("`") for cell in line.strip("|").split("|")])
    return table


def test_configuration_table_is_the_settings_table() -> None:
    section = README.split("## Configuration\n", 1)[1].split("\n## ", 1)[0]
    # Rendered from the settings' declarations: `python -m tiw_facade.settings --markdown`.
    assert markdown_table() in section


def test_error_table_is_the_code_table() -> None:
    rows = table_rows("Errors")
    assert [(r[0], r[1]) for r in rows] == [(pattern, code.name) for pattern, code in ERROR_TABLE]


def test_the_two_commands_exist() -> None:
    makefile = (ROOT / "Makefile").read_text()
    for command in re.findall(r"^make (\w+)", README, flags=re.MULTILINE):
        assert re.search(rf"^{command}:", makefile, flags=re.MULTILINE), (
            f"make {command} is not in the Makefile"
        )
    ci = (ROOT / ".ci" / "run").read_text()
    assert "make test" in ci, "CI runs the README's test command"


def test_alert_table_lists_every_alert() -> None:
    rule = yaml.safe_load((ROOT / "k8s" / "monitoring" / "prometheusrule.yaml").read_text())
    alerts = [r["alert"] for group in rule["spec"]["groups"] for r in group["rules"] if "alert" in r]
    section = README.split("The alerts (", 1)[1]
    rows = [line for line in section.splitlines() if line.startswith("| `")]
    assert [row.split("`")[1] for row in rows] == alerts


def code_block(after: str, language: str) -> str:
    """The first ```language block after the text ``after``."""
    rest = README.split(after, 1)[1]
    return rest.split(f"```{language}\n", 1)[1].split("```", 1)[0]


async def run(*command: str) -> tuple[int, str]:
    process = await asyncio.create_subprocess_exec(
        *command, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    output, _ = await asyncio.wait_for(process.communicate(), timeout=60)
    assert process.returncode is not None
    return process.returncode, output.decode()


async def test_the_shell_client_example_works(facade: Facade) -> None:
    line = code_block("the facade's own shell client:", "sh").strip()
    assert line.startswith(".venv/bin/tiw-facade call "), "the first thing a newcomer runs"
    words = shlex.split(line)[1:]  # what follows the command: call ACTION JSON
    code, output = await run(sys.executable, "-m", "tiw_facade.cli", *words, "--target", facade.target)
    assert code == 0, output
    assert json.loads(output)["TaskId"] == "ghucnligqtgtvk2624mb"


async def test_the_buf_curl_example_works(facade: Facade) -> None:
    buf = ROOT / "node_modules" / ".bin" / "buf"
    assert buf.exists(), "buf is installed by `make test` (scripts/install-tools)"
    command = (
        code_block("into `node_modules/.bin`:", "sh")
        .removeprefix("make tools\n")  # what `make test` has done already
        .replace("\\\n", " ")
        .replace("localhost:50051", facade.target)
    )
    code, output = await run("bash", "-c", f"cd {ROOT} && {command}")
    assert code == 0, output
    assert json.loads(output)["TaskId"] == "ghucnligqtgtvk2624mb"
