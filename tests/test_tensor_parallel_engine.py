"""Tensor parallelism through the whole engine: worker processes per rank over gloo, the step
sent from the engine core, greedy output token for token equal to one rank in fp32."""

import json
import os
import signal
import time
from pathlib import Path

import httpx
import pytest
from server_harness import RunningServer
from tiny_models import save_tiny_model

from ropeway import LLM, ContextParams, EngineConfig, SamplingParams
from ropeway.engine import AsyncLLM

# Models in processes of their own (engine core, workers).
pytestmark = pytest.mark.slow

GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
PROMPTS = [[5, 9, 17, 33, 65, 129, 2, 4], list(range(40, 100)), [200, 100, 50, 25, 12, 6, 3]]


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> str:
    directory = tmp_path_factory.mktemp("tiny-llama")
    save_tiny_model(directory, "llama")  # 4 query / 2 KV heads: split at TP 2, replicated at TP 4
    return str(directory)


def generate(options: dict, prompts, runs=((GREEDY, None),)) -> list[list[list[int]]]:
    """Token ids of each prompt, for each (params, context) run, on one engine."""
    llm = LLM(dtype="float32", kv_cache_memory_bytes=8 << 20, max_num_batched_tokens=64, **options)
    try:
        return [[o.outputs[0].token_ids for o in llm.generate(prompts, params, context=context, use_tqdm=False)]
                for params, context in runs]
    finally:
        llm.engine.core.shutdown()


@pytest.mark.parametrize("size", [2, 4])
def test_tiny_model_at_tp_2_and_4_matches_one_rank(tiny_llama, size):
    # Chunked prefill (a 64-token budget) mixed with decodes, and asynchronous scheduling, whose
    # placeholders reach the workers by broadcast.
    options = dict(model=tiny_llama, async_scheduling=True)
    assert generate({**options, "tensor_parallel_size": size}, PROMPTS) == generate(options, PROMPTS)


def test_default_model_at_tp_3_matches_one_rank_with_a_bounded_cache(default_llm):
    prompts = [default_llm.tokenizer.encode(p) for p in
               ("The old lighthouse keeper climbed the stairs every evening and", "def fibonacci(n):")]
    # The second run's sink_window cache evicts and re-rotates kept keys on every rank.
    window = ContextParams(context_policy={"type": "sink_window", "sinks": 4, "window": 32})
    runs = ((GREEDY, None), (SamplingParams(temperature=0, max_tokens=40, ignore_eos=True), window))
    one = [[o.outputs[0].token_ids for o in default_llm.generate(prompts, p, context=c, use_tqdm=False)]
           for p, c in runs]
    assert generate({"tensor_parallel_size": 3}, prompts, runs) == one


def worker_pids(core_pid: int) -> list[int]:
    children = Path(f"/proc/{core_pid}/task/{core_pid}/children").read_text().split()
    return [int(pid) for pid in children if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes()]


def test_a_killed_worker_fails_open_streams_and_turns_health_503(tiny_llama):
    engine = AsyncLLM.spawn(EngineConfig(model=tiny_llama, dtype="float32", tensor_parallel_size=2,
                                         kv_cache_memory_bytes=8 << 20))
    engine.start()
    try:
        with RunningServer(engine) as server:
            body = {"prompt": [5, 6, 7], "max_tokens": 200, "ignore_eos": True, "stream": True}
            frames = []
            with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=60) as response:
                lines = (line.removeprefix("data: ") for line in response.iter_lines() if line.startswith("data: "))
                frames.append(next(lines))
                [worker] = worker_pids(engine.core.process.pid)
                os.kill(worker, signal.SIGKILL)
                killed = time.monotonic()
                frames.extend(lines)
            assert frames[-1] == "[DONE]"
            error = json.loads(frames[-2])["error"]
            assert error["type"] == "server_error" and "worker" in error["message"]
            while httpx.get(f"{server.url}/health").status_code != 503:
                assert time.monotonic() - killed < 5, "/health still 200 five seconds after a worker died"
                time.sleep(0.1)
    finally:
        engine.shutdown()
