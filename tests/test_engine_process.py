"""The engine core in a process of its own, as `ropeway serve` runs it: requests cross ZeroMQ as
msgpack, and a dead engine process fails every open request and turns /health to 503."""

import json
import os
import signal
import time

import httpx
import pytest
from server_harness import RunningServer

from ropeway import EngineConfig, SamplingParams
from ropeway.engine import AsyncLLM

# Models in processes of their own (engine core, workers).
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def spawned():
    engine = AsyncLLM.spawn(EngineConfig(dtype="float32", max_model_len=1024, kv_cache_memory_bytes=64 << 20,
                                         max_num_seqs=8))
    engine.start()
    yield engine
    engine.shutdown()


def test_the_engine_process_serves_what_the_in_process_engine_computes(spawned, default_llm):
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    prompt = "The lighthouse keeper counted the ships"
    expected = default_llm.generate([prompt], params)[0].outputs[0]
    with RunningServer(spawned) as server:
        reply = httpx.post(f"{server.url}/v1/completions", timeout=60,
                           json={"prompt": prompt, "max_tokens": 12, "temperature": 0, "ignore_eos": True}).json()
    assert reply["choices"][0]["text"] == expected.text
    assert spawned.stats.generation_tokens >= 12  # the snapshot crossed from the engine process


def test_a_killed_engine_process_fails_open_streams_and_health(spawned):
    with RunningServer(spawned) as server:
        assert httpx.get(f"{server.url}/health").status_code == 200
        body = {"prompt": "Once upon a time", "max_tokens": 900, "ignore_eos": True, "stream": True}
        frames = []
        with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=60) as response:
            lines = (line.removeprefix("data: ") for line in response.iter_lines() if line.startswith("data: "))
            frames.append(next(lines))
            os.kill(spawned.core.process.pid, signal.SIGKILL)
            killed = time.monotonic()
            frames.extend(lines)
        assert frames[-1] == "[DONE]"
        error = json.loads(frames[-2])["error"]
        assert error["type"] == "server_error" and "engine" in error["message"]
        while httpx.get(f"{server.url}/health").status_code != 503:
            assert time.monotonic() - killed < 5, "/health still 200 five seconds after the engine died"
            time.sleep(0.1)
        refused = httpx.post(f"{server.url}/v1/completions", json={"prompt": "Hi", "max_tokens": 2})
        assert refused.status_code == 503 and refused.json()["error"]["message"]
