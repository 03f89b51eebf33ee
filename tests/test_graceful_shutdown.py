"""SIGTERM on `ropeway serve`, as Kubernetes sends it: stop accepting, drain, exit 0."""

import json
import os
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest
from server_harness import free_port, wait_until_healthy

pytestmark = pytest.mark.slow  # a server in a subprocess, draining for seconds

# This tree's server (the venv's `ropeway` script may belong to another checkout).
ROPEWAY = [sys.executable, "-m", "ropeway.server.cli"]
SHUTDOWN_TIMEOUT = 15.0
SHORT_TOKENS = 8


class StreamReader(threading.Thread):
    """Reads one streamed completion in the background, remembering its frames and how it ended."""

    def __init__(self, url: str, max_tokens: int):
        super().__init__(daemon=True)
        self.body = {"prompt": "Once upon a time", "max_tokens": max_tokens, "temperature": 0,
                     "ignore_eos": True, "stream": True}
        self.url = url
        self.frames: list[str] = []
        self.first_frame = threading.Event()
        self.error: Exception | None = None

    def run(self) -> None:
        try:
            with httpx.stream("POST", f"{self.url}/v1/completions", json=self.body, timeout=120) as response:
                for line in response.iter_lines():
                    if line.startswith("data: "):
                        self.frames.append(line.removeprefix("data: "))
                        self.first_frame.set()
        except httpx.HTTPError as error:
            self.error = error
        self.first_frame.set()

    @property
    def chunks(self) -> list[dict]:
        return [json.loads(frame) for frame in self.frames if frame != "[DONE]" and "choices" in json.loads(frame)]

    @property
    def errors(self) -> list[dict]:
        return [json.loads(frame)["error"] for frame in self.frames if frame != "[DONE]" and "error" in frame]

    @property
    def tokens(self) -> int:
        return sum(1 for chunk in self.chunks if chunk["choices"][0]["text"] != "")

    @property
    def finish_reasons(self) -> list[str]:
        return [chunk["choices"][0]["finish_reason"] for chunk in self.chunks if chunk["choices"][0]["finish_reason"]]


def test_sigterm_stops_accepting_drains_running_requests_up_to_the_timeout_then_exits_0():
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    process = subprocess.Popen([*ROPEWAY, "serve", "--port", str(port), "--max-model-len", "2048",
                                "--kv-cache-memory", "256MiB", "--shutdown-timeout", str(SHUTDOWN_TIMEOUT)],
                               stderr=subprocess.PIPE, text=True, env={**os.environ, "ROPEWAY_API_KEY": ""})
    try:
        wait_until_healthy(url, process)
        # One request that ends soon after the signal, one that would outlive the timeout.
        short, endless = StreamReader(url, SHORT_TOKENS), StreamReader(url, 2000)
        for reader in (endless, short):
            reader.start()
            assert reader.first_frame.wait(60) and reader.error is None
        process.send_signal(signal.SIGTERM)
        signalled = time.monotonic()

        refused = False
        while not refused and time.monotonic() - signalled < 3:
            try:
                httpx.get(f"{url}/health", timeout=1)
                time.sleep(0.05)
            except (httpx.ConnectError, httpx.ReadError):
                # Refused, or reset: a connection that reached the backlog as the listener
                # closed is dropped, not served.
                refused = True
        assert refused, "still accepting connections after SIGTERM"

        short.join(SHUTDOWN_TIMEOUT)
        assert not short.is_alive() and short.error is None
        assert short.finish_reasons == ["length"] and short.frames[-1] == "[DONE]", (short.tokens, short.errors)
        assert short.tokens == SHORT_TOKENS

        assert process.wait(SHUTDOWN_TIMEOUT + 20) == 0
        drained_for = time.monotonic() - signalled
        endless.join(5)
        # The long stream ran until just before the timeout, then ended with an error frame and
        # [DONE] (issue 23): nothing was left for uvicorn to cancel, and nothing went wrong.
        assert endless.finish_reasons == [] and endless.frames[-1] == "[DONE]"
        assert [error["code"] for error in endless.errors] == ["server_shutting_down"]
        assert SHUTDOWN_TIMEOUT - 2 <= drained_for < SHUTDOWN_TIMEOUT + 20
        log = process.stderr.read()
        assert "timeout graceful shutdown exceeded" not in log
        assert "Traceback" not in log and "CancelledError" not in log
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
