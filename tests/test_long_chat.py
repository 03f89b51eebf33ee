"""A 30-turn chat through the openai client against a real server with a sink_window cache:
the history outgrows the model's 8k context by half again, every turn is answered, turns
continue from the retained session, and time to first token does not grow with history.
(Prefilling the history is most of the test's time on a CPU: 30 turns, not 50, keep the suite
short while the cache still evicts a dozen windows' worth.)"""

import statistics
import time

import httpx
import openai
import pytest
from server_harness import MODEL_NAME, RunningServer

from ropeway.engine import AsyncLLM

pytestmark = pytest.mark.slow  # a thirty-turn chat

TURNS = 30
POLICY = {"type": "sink_window", "sinks": 4, "window": 1024}


@pytest.fixture(scope="module")
def chat_server(make_llm):
    llm = make_llm(max_model_len=2048, context_policy=POLICY, kv_cache_memory_bytes=256 << 20,
                   max_num_batched_tokens=256)
    engine = AsyncLLM.in_thread(llm.engine)
    engine.start()
    with RunningServer(engine) as server:
        yield server, llm
    engine.shutdown()


def user_messages(count: int) -> list[str]:
    """Distinct passages of real English (Python's documentation), about 450 tokens each."""
    import pydoc_data.topics

    text = "\n".join(pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics))
    size = 1800
    return [f"Summarise this passage in one sentence:\n{text[i * size:(i + 1) * size]}" for i in range(count)]


def test_thirty_turn_chat_outgrows_the_context_and_keeps_answering(chat_server):
    server, llm = chat_server
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)
    messages = [{"role": "system", "content": "You are a concise assistant."}]
    first_token_seconds = []
    for text in user_messages(TURNS):
        messages.append({"role": "user", "content": text})
        started = time.perf_counter()
        first = None
        reply = ""
        stream = client.chat.completions.create(model=MODEL_NAME, messages=messages, stream=True,
                                                max_tokens=12, temperature=0)
        for chunk in stream:
            delta = chunk.choices[0].delta.content if chunk.choices else None
            if delta:
                first = first or time.perf_counter()
                reply += delta
        assert reply.strip(), f"turn {len(first_token_seconds) + 1} got no answer"
        first_token_seconds.append(first - started)
        messages.append({"role": "assistant", "content": reply})

    history_tokens = len(llm.tokenizer.encode_chat(messages))
    assert history_tokens > 1.5 * 8192  # the model's trained context, overflowed

    metrics = httpx.get(f"{server.url}/metrics").text
    hits = sum(float(line.split()[-1]) for line in metrics.splitlines()
               if line.startswith("ropeway:session_hits_total"))
    evictions = sum(float(line.split()[-1]) for line in metrics.splitlines()
                    if line.startswith("ropeway:kv_evictions_total"))
    assert hits >= TURNS - 5
    assert evictions > 0
    early = statistics.median(first_token_seconds[1:11])
    late = statistics.median(first_token_seconds[-10:])
    assert late < 2 * early + 0.25, (early, late)
