"""The repository stands on its own: nothing it ships points outside it."""

from __future__ import annotations

import pathlib
import re
import subprocess

ROOT = pathlib.Path(__file__).resolve().parent.parent
# A path that climbs out of the checkout: a reader of the repository will not have what it names.
OUTSIDE = re.compile(r"\.\./shared\b|/work/shared\b")


def tracked_files() -> list[pathlib.Path]:
    listing = subprocess.run(
        ["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True
    ).stdout.decode()
    return [ROOT / name for name in listing.split("\0") if name and not name.startswith(".ci/")]


def test_no_file_points_outside_the_repository() -> None:
    offenders = []
    for path in tracked_files():
        if not path.is_file():
            continue
        try:
            text = path.read_text()
        except UnicodeDecodeError:
            continue
        offenders += [
            f"{path.relative_to(ROOT)}:{number}"
            for number, line in enumerate(text.splitlines(), 1)
            if OUTSIDE.search(line) and path.name != "test_repository.py"
        ]
    assert offenders == [], "move what these point at into docs/"


def test_every_docs_link_in_the_readme_exists() -> None:
    readme = (ROOT / "README.md").read_text()
    links = re.findall(r"\]\(((?:docs|bench|k8s|protos)/[^)#]+)", readme)
    assert links, "the README links its docs"
    missing = [link for link in links if not (ROOT / link).exists()]
    assert missing == []
