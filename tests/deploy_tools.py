"""Finding the command-line tools the deployment tests drive (hadolint, prometheus, promtool)."""

import os
import shutil
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def require_tool(name: str, install_hint: str) -> str:
    """The tool's path: the venv's own first, then PATH. Missing: a failure in CI, a skip elsewhere."""
    beside_python = Path(sys.executable).parent / name
    found = str(beside_python) if beside_python.exists() else shutil.which(name)
    if found is None:
        if os.environ.get("CI"):
            pytest.fail(f"{name} is missing: {install_hint}")
        pytest.skip(f"{name} is not installed ({install_hint})")
    return found
