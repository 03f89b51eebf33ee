"""Fault isolation in the engine core: a fault raised while admitting, scheduling, sampling or
reporting on one request fails that request alone, and the engine goes on serving the others; a
fault of the forward pass (device state unknown) stops it, and /health says why. Faults are
injected with ropeway.fault_injection into a real engine core serving a real uvicorn server."""

import threading

import httpx
import openai
import pytest
from server_harness import MODEL_NAME, RunningServer

from ropeway import SamplingParams, fault_injection
from ropeway.engine import AsyncLLM
from ropeway.engine.faults import RequestFailedError

MARKER = "<<inject a fault>>"
SURVIVOR_PROMPT = "The three primary colors are"
SURVIVOR_TOKENS = 24


@pytest.fixture(autouse=True)
def disarmed():
    yield
    fault_injection.disarm()


@pytest.fixture(scope="module")
def engine(make_llm):
    llm = make_llm(max_model_len=512, max_num_seqs=8, kv_cache_memory_bytes=64 << 20, async_scheduling=True)
    async_engine = AsyncLLM.in_thread(llm.engine)
    async_engine.start()
    yield async_engine
    async_engine.shutdown()


@pytest.fixture(scope="module")
def server(engine):
    with RunningServer(engine) as running:
        yield running


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def survivor_text(client):
    """The survivor's greedy completion on a quiet server: what it must still be beside a fault."""
    return client.completions.create(model=MODEL_NAME, prompt=SURVIVOR_PROMPT, max_tokens=SURVIVOR_TOKENS,
                                     temperature=0).choices[0].text


def stream_in_background(client) -> tuple[threading.Thread, list]:
    result = []

    def run():
        chunks = client.completions.create(model=MODEL_NAME, prompt=SURVIVOR_PROMPT, max_tokens=SURVIVOR_TOKENS,
                                           temperature=0, stream=True)
        result.append("".join(chunk.choices[0].text for chunk in chunks if chunk.choices))

    thread = threading.Thread(target=run)
    thread.start()
    return thread, result


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["admit", "schedule", "sample", "report"])
def test_a_fault_at_one_stage_fails_only_its_request(stage, client, server, engine, survivor_text):
    fault_injection.arm(stage, MARKER)
    survivor, survivor_result = stream_in_background(client)
    # temperature > 0 and n = 2: host-side sampling, two choices of one request, both fail.
    with pytest.raises(openai.InternalServerError) as failure:
        client.completions.create(model=MODEL_NAME, prompt=f"{MARKER} Once upon a time", max_tokens=8,
                                  temperature=0.8, n=2)
    assert failure.value.status_code == 500
    assert failure.value.body["type"] == "server_error"
    survivor.join(60)
    assert survivor_result == [survivor_text]
    # The engine goes on: a new request is served, /health is 200, nothing leaked.
    after = client.completions.create(model=MODEL_NAME, prompt="Hello", max_tokens=3, temperature=0)
    assert after.choices[0].finish_reason == "length"
    assert httpx.get(f"{server.url}/health").status_code == 200
    assert engine.stats.num_running == 0 and engine.stats.num_waiting == 0
    assert engine.stats.kv_used_blocks == 0
    assert engine.stats.request_failures >= 1


def test_a_failing_stats_snapshot_never_stops_the_engine(client, server, engine):
    fault_injection.arm("stats", MARKER)
    steps_before = engine.stats.steps
    reply = client.completions.create(model=MODEL_NAME, prompt="Hello", max_tokens=3, temperature=0)
    assert reply.choices[0].finish_reason == "length"
    assert engine.stats.steps == steps_before  # no snapshot got through while armed
    fault_injection.disarm()
    client.completions.create(model=MODEL_NAME, prompt="Hello", max_tokens=3, temperature=0)
    assert engine.stats.steps > steps_before
    assert httpx.get(f"{server.url}/health").status_code == 200


def test_a_fault_in_the_forward_pass_stops_the_engine_and_health_says_why(make_llm):
    llm = make_llm(max_model_len=256, max_num_seqs=4, kv_cache_memory_bytes=16 << 20)
    engine = AsyncLLM.in_thread(llm.engine)
    engine.start()
    try:
        with RunningServer(engine) as server:
            client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
            fault_injection.arm("execute", MARKER)
            with pytest.raises(openai.InternalServerError):
                client.completions.create(model=MODEL_NAME, prompt=MARKER, max_tokens=3)
            health = httpx.get(f"{server.url}/health")
            assert health.status_code == 503
            assert "fault injected at stage 'execute'" in health.json()["error"]["message"]
            with pytest.raises(openai.APIStatusError) as refused:
                client.completions.create(model=MODEL_NAME, prompt="Hello", max_tokens=3)
            assert refused.value.status_code == 503
    finally:
        engine.shutdown()


def test_offline_generate_raises_for_the_failed_request_and_the_engine_serves_on(make_llm):
    llm = make_llm(max_model_len=256, max_num_seqs=4, kv_cache_memory_bytes=16 << 20)
    fault_injection.arm("sample", MARKER)
    params = SamplingParams(temperature=0.8, max_tokens=4, seed=1)
    with pytest.raises(RequestFailedError, match="while sampling"):
        llm.generate([f"{MARKER} one", "two"], params)
    assert not llm.engine.has_unfinished_requests()
    assert llm.engine.block_manager.num_used_blocks == 0
    fault_injection.disarm()
    outputs = llm.generate(["two"], params)
    assert len(outputs[0].outputs[0].token_ids) == 4
