"""The README as a newcomer follows it: its code blocks, read from the file so they cannot drift,
run as pasted; and scripts/bootstrap in a fresh copy of the tree, imported from next to it."""

import ast
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import httpx
import pytest
from server_harness import free_port

pytestmark = pytest.mark.slow  # the model in subprocesses

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()
# Subprocesses import this tree, as a path entry (what scripts/bootstrap's editable install is).
THIS_TREE = {**os.environ, "PYTHONPATH": str(REPO)}


def python_block(marker: str) -> str:
    """The README's one ```python block that contains marker."""
    blocks = [b for b in re.findall(r"^```python\n(.*?)^```", README, re.S | re.M) if marker in b]
    assert len(blocks) == 1, f"expected one python block with {marker!r} in README.md, found {len(blocks)}"
    return blocks[0]


def clone_like_folder(parent: Path) -> Path:
    """parent/ropeway/ as a clone leaves it: a folder without __init__.py, which Python would
    take for a namespace package `ropeway` when run from parent."""
    clone = parent / "ropeway"
    clone.mkdir()
    shutil.copy(REPO / "pyproject.toml", clone)
    return clone


def test_offline_example_runs_from_the_folder_holding_the_clone(tmp_path):
    clone_like_folder(tmp_path)
    done = subprocess.run([sys.executable, "-c", python_block("from ropeway import LLM")], cwd=tmp_path,
                          env=THIS_TREE, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.split("\n")  # not splitlines(): a completion's repr may hold a U+2028
    assert lines[0] == "The capital of France is Paris."  # what the README's comment promises
    # Two prompts, n=2 each: a list of two completions per line.
    completions = [ast.literal_eval(line) for line in lines[1:] if line]
    assert [len(c) for c in completions] == [2, 2] and all(text for c in completions for text in c)
    assert "generating" in done.stderr  # the progress bar


@pytest.fixture(scope="module")
def serve_on_free_port():
    """`ropeway serve` as the README starts it, but on a free port (others may hold 8000)."""
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "ropeway.server.cli", "serve", "--port", str(port)],
                               env=THIS_TREE, cwd=REPO, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 180
    while True:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                break
        except httpx.TransportError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"ropeway serve did not come up:\n{process.stderr.read()}")
        time.sleep(0.2)
    yield port
    process.terminate()
    process.wait(60)


def test_client_example_streams_a_sensible_answer(serve_on_free_port):
    code = python_block("from openai import OpenAI")
    assert "http://127.0.0.1:8000/v1" in code
    code = code.replace("127.0.0.1:8000", f"127.0.0.1:{serve_on_free_port}")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "Paris" in done.stdout


def test_bootstrap_installs_a_ropeway_that_imports_from_next_to_the_clone(tmp_path):
    """scripts/bootstrap in a copy of the tree, then `from ropeway import LLM` from the folder
    holding it. Its .venv layers on this environment's packages (torch and the rest are not
    downloaded again); pip still reaches PyPI for pip and setuptools."""
    clone = tmp_path / "ropeway"
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
    for name in tracked.decode().split("\0"):
        if name and (REPO / name).is_file():
            (clone / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, clone / name)
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", clone / ".venv"], check=True)
    venv_python = clone / ".venv" / "bin" / "python"
    site = subprocess.run([venv_python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    # A plain path line: this environment's packages, without running its own .pth files (the
    # editable install of whichever checkout it holds).
    (Path(site) / "shared_packages.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "TRITON_INTERPRET")}
    done = subprocess.run([clone / "scripts" / "bootstrap"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert "Editable install" not in done.stdout + done.stderr  # setuptools' banner
    probe = "import ropeway; from ropeway import LLM; print(ropeway.__file__)"
    imported = subprocess.run([venv_python, "-c", probe], cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=120)
    assert imported.returncode == 0, imported.stderr
    assert Path(imported.stdout.strip()) == clone / "ropeway" / "__init__.py"
    version = subprocess.run([clone / ".venv" / "bin" / "ropeway", "--version"], cwd=tmp_path, env=env,
                             capture_output=True, text=True, timeout=60)
    assert version.stdout.startswith("ropeway ")
