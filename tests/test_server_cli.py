"""`ropeway serve` as a user runs it: the console script in a subprocess."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest
from server_harness import MODEL_NAME, free_port

from ropeway.server.cli import build_parser, memory_size

ROPEWAY = Path(sys.executable).parent / "ropeway"
REPO = Path(__file__).resolve().parents[1]
# The console script runs this tree's code whichever checkout the venv installed.
THIS_TREE = {**os.environ, "PYTHONPATH": str(REPO)}


def test_memory_sizes():
    assert memory_size("1024") == 1024
    assert memory_size("512MiB") == 512 * 2**20
    assert memory_size("2GiB") == 2 * 2**30
    assert memory_size("1.5GB") == 1_500_000_000


def test_serve_defaults_to_the_default_model_on_localhost_8000():
    args = build_parser().parse_args(["serve"])
    assert (args.host, args.port, args.model, args.api_key) == ("127.0.0.1", 8000, None, None)


def test_kv_cache_dtype_flag_reaches_the_engine_config_and_refuses_unknown_dtypes(capsys):
    from ropeway.server.cli import engine_config

    parser = build_parser()
    assert engine_config(parser.parse_args(["serve"])).kv_cache_dtype == "auto"
    assert engine_config(parser.parse_args(["serve", "--kv-cache-dtype", "fp8"])).kv_cache_dtype == "fp8"
    with pytest.raises(SystemExit):
        parser.parse_args(["serve", "--kv-cache-dtype", "int4"])
    assert "--kv-cache-dtype: invalid choice: 'int4'" in capsys.readouterr().err


def test_sampler_cuda_graphs_flag_reaches_the_engine_config_off_by_default():
    from ropeway.server.cli import engine_config

    parser = build_parser()
    assert engine_config(parser.parse_args(["serve"])).sampler_cuda_graphs is False
    assert engine_config(parser.parse_args(["serve", "--sampler-cuda-graphs"])).sampler_cuda_graphs is True


def test_help_never_shows_the_api_key():
    done = subprocess.run([ROPEWAY, "serve", "--help"], capture_output=True, text=True, timeout=60,
                          env={**THIS_TREE, "ROPEWAY_API_KEY": "do-not-print"})
    assert done.returncode == 0 and "--max-waiting" in done.stdout
    assert "do-not-print" not in done.stdout


def run_cli(*args: str) -> subprocess.CompletedProcess:
    """The CLI of this tree (the console script may belong to another checkout's install)."""
    return subprocess.run([sys.executable, "-m", "ropeway.server.cli", *args], capture_output=True, text=True,
                          timeout=60, cwd=REPO)


def test_help_and_version_load_neither_torch_nor_the_engine():
    code = ("import sys; from ropeway.server.cli import main\n"
            "for argv in (['serve', '--help'], ['--version']):\n"
            "    try: main(argv)\n"
            "    except SystemExit: pass\n"
            "heavy = [m for m in ('torch', 'ropeway.engine', 'uvicorn', 'fastapi') if m in sys.modules]\n"
            "assert not heavy, heavy")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          cwd=REPO)
    assert done.returncode == 0, done.stderr
    assert "--session-store-fraction" in done.stdout


def test_version_is_the_package_version():
    from importlib.metadata import version

    done = run_cli("--version")
    assert (done.returncode, done.stdout.strip()) == (0, f"ropeway {version('ropeway')}")


def test_bare_ropeway_prints_the_help():
    done = run_cli()
    assert done.returncode == 0 and done.stderr == ""
    assert done.stdout.startswith("usage: ropeway") and "serve" in done.stdout


def test_help_shows_every_default():
    help_text = " ".join(run_cli("serve", "--help").stdout.split())
    assert "retained chat sessions (sink_window) (default: 0.25)" in help_text


@pytest.mark.slow
def test_a_model_that_cannot_load_exits_with_a_message_not_a_traceback(tmp_path):
    missing = tmp_path / "nothing.gguf"
    done = subprocess.run([ROPEWAY, "serve", "--model", str(missing)], capture_output=True, text=True, timeout=60,
                          env=THIS_TREE)
    assert done.returncode == 2
    assert "cannot start" in done.stderr and "Traceback" not in done.stderr


@pytest.fixture(scope="module")
def served():
    """The console script with an API key from the environment, as a deployment runs it."""
    port = free_port()
    env = {**THIS_TREE, "ROPEWAY_API_KEY": "cli-key"}
    process = subprocess.Popen([ROPEWAY, "serve", "--port", str(port), "--max-model-len", "512",
                                "--kv-cache-memory", "64MiB"], env=env, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                break
        except httpx.TransportError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"ropeway serve did not come up:\n{process.stderr.read()}")
        time.sleep(0.2)
    yield url, process
    if process.poll() is None:
        process.send_signal(signal.SIGINT)
        process.wait(30)


@pytest.mark.slow  # the model in a subprocess
def test_console_script_serves_with_the_key_from_the_environment(served):
    url, _ = served
    assert httpx.get(f"{url}/v1/models").status_code == 401
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="cli-key", max_retries=0)
    assert [m.id for m in client.models.list().data] == [MODEL_NAME]
    reply = client.chat.completions.create(model=MODEL_NAME, max_tokens=8, temperature=0,
                                           messages=[{"role": "user", "content": "What is the capital of France?"}])
    assert "Paris" in reply.choices[0].message.content


@pytest.mark.slow
def test_start_up_logs_model_dtype_device_pool_and_url_then_stops_cleanly(served):
    url, process = served
    process.send_signal(signal.SIGINT)
    assert process.wait(30) == 0
    log = process.stderr.read()
    assert "on cpu in float32" in log
    assert "KV pool:" in log and "max_model_len 512" in log
    assert f"serving {MODEL_NAME} at {url}" in log
    assert f"model {MODEL_NAME} (llama, 30 layers)" in log  # as the API names it, not the GGUF's metadata
