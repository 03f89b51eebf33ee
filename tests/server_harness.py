"""Real uvicorn servers on 127.0.0.1 for the server tests, each on a free port in a thread."""

import contextlib
import json
import os
import signal
import socket
import subprocess
import threading
import time

import httpx
import openai
import uvicorn
from openai_spec import SpecCheckedApp

from ropeway.engine import AsyncLLM
from ropeway.server.app import build_app
from ropeway.server.context import ServerContext, ServerSettings
from ropeway.server.header_timeout import HeaderTimeoutProtocol

MODEL_NAME = "SmolLM2-135M-Instruct"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class RunningServer:
    """uvicorn as `ropeway serve` configures it (HTTP protocol included); settings are ServerSettings'."""

    def __init__(self, engine: AsyncLLM, http_protocol: type = HeaderTimeoutProtocol, **settings):
        self.ctx = ServerContext.create(engine, ServerSettings(served_model_names=(MODEL_NAME,), **settings))
        self.port = free_port()
        # Every response is checked against OpenAI's spec on its way out (conftest.py reports).
        config = uvicorn.Config(SpecCheckedApp(build_app(self.ctx)), host="127.0.0.1", port=self.port,
                                log_level="warning", http=http_protocol)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, name=f"uvicorn-{self.port}", daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> "RunningServer":
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *_) -> None:
        self._server.should_exit = True
        self._thread.join(10)
        self.ctx.tokenizers.shutdown()


@contextlib.contextmanager
def serving(llm, **settings):
    """A RunningServer over an in-thread engine core for `llm`'s engine, shut down afterwards."""
    engine = AsyncLLM.in_thread(llm.engine)
    engine.start()
    try:
        with RunningServer(engine, **settings) as running:
            yield running
    finally:
        engine.shutdown()


def openai_client(server: RunningServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


def wait_until_healthy(url: str, process: subprocess.Popen, timeout: float = 120) -> None:
    """Wait for a server started as a subprocess to answer /health; fail with its log if it exits."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            log = process.stderr.read() if process.stderr else ""
            raise RuntimeError(f"{url} did not come up:\n{log}")
        time.sleep(0.2)


def kill_mid_stream(url: str, body: dict, pid: int, says: str) -> None:
    """Start a completion stream, kill process pid after its first frame, and check what a dying
    engine must do: the stream ends with an OpenAI error naming `says`, then [DONE], and /health
    turns 503 within 5 s."""
    frames = []
    with httpx.stream("POST", f"{url}/v1/completions", json={**body, "stream": True}, timeout=60) as response:
        lines = (line.removeprefix("data: ") for line in response.iter_lines() if line.startswith("data: "))
        frames.append(next(lines))
        os.kill(pid, signal.SIGKILL)
        killed = time.monotonic()
        frames.extend(lines)
    assert frames[-1] == "[DONE]"
    error = json.loads(frames[-2])["error"]
    assert error["type"] == "server_error" and says in error["message"]
    while httpx.get(f"{url}/health").status_code != 503:
        assert time.monotonic() - killed < 5, f"/health still 200 five seconds after the {says} died"
        time.sleep(0.1)
