"""The README stays true: its tables are the code's tables, its commands exist."""

from __future__ import annotations

import pathlib
import re

from tiw_facade.errors import ERROR_TABLE
from tiw_facade.settings import ENVIRONMENT

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
    rows = table_rows("Configuration")
    assert [(r[0], r[1], r[2]) for r in rows] == [(s.env, s.default, s.help) for s in ENVIRONMENT]


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
