"""A long prompt whose client went away stops between two layers of its step, and a server
SIGTERMed meanwhile exits at once instead of finishing the prefill nobody wants (issue 24)."""

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time

import pytest
from server_harness import free_port, wait_until_healthy

pytestmark = pytest.mark.slow  # a server in a subprocess and a 4k-token prompt

ROPEWAY = [sys.executable, "-m", "ropeway.server.cli"]
PROMPT_TOKENS = 4000
# Admission of the prompt (HTTP, validation, ZeroMQ) takes well under this; its one prefill step
# (4k tokens, the whole prompt in one chunk) takes several seconds on 2 CPU threads.
STEP_UNDER_WAY_SECONDS = 3.0
EXIT_SECONDS = 8.0  # the API process stops its engine core within 10 s, killing it otherwise


def test_abandoned_long_prefill_stops_mid_step_and_sigterm_exits_at_once():
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    process = subprocess.Popen([*ROPEWAY, "serve", "--port", str(port), "--max-model-len", "8192",
                                "--max-num-batched-tokens", "4096", "--kv-cache-memory", "512MiB"],
                               stderr=subprocess.PIPE, text=True, env={**os.environ, "ROPEWAY_API_KEY": ""})
    try:
        wait_until_healthy(url, process)
        prompt = random.Random(0).choices(range(100, 40000), k=PROMPT_TOKENS)
        body = json.dumps({"prompt": prompt, "max_tokens": 1}).encode()
        # A client that sends a long prompt and hangs up without reading an answer.
        client = socket.create_connection(("127.0.0.1", port))
        client.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                       b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        time.sleep(STEP_UNDER_WAY_SECONDS)
        client.close()
        process.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        assert process.wait(EXIT_SECONDS + 20) == 0
        exited_after = time.monotonic() - signalled
        log = process.stderr.read()
        # The step stopped between layers (the core says how far it got), not at its end.
        assert "tokens was dropped after" in log, log[-3000:]
        assert "the engine core did not stop" not in log
        assert exited_after < EXIT_SECONDS, log[-3000:]
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
