"""The OpenAI-compatible server, end to end: a real uvicorn server on the default model,
driven by the official `openai` client and raw httpx."""

import asyncio
import json
import os
import re
import shutil
import subprocess
import time

import httpx
import openai
import pytest
from server_harness import MODEL_NAME, RunningServer

from ropeway import SamplingParams
from ropeway.engine import AsyncLLM

MAX_MODEL_LEN = 1024
MAX_NUM_SEQS = 32
GREEDY = {"temperature": 0}
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def engine(make_llm):
    """The server's engine: its own KV pool and scheduler on the session's loaded model, with
    asynchronous scheduling on, as a server on CUDA runs (greedy steps read a step late)."""
    llm = make_llm(max_model_len=MAX_MODEL_LEN, max_num_seqs=MAX_NUM_SEQS, kv_cache_memory_bytes=256 << 20,
                   async_scheduling=True)
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
def http(server):
    with httpx.Client(base_url=server.url, timeout=60) as session:
        yield session


@pytest.fixture(scope="module")
def reference(default_llm):
    """Offline greedy generation on its own engine: what the server must reproduce."""
    def complete(prompt, max_tokens, **options):
        params = SamplingParams(temperature=0, max_tokens=max_tokens, **options)
        return default_llm.generate([prompt], params)[0].outputs[0]

    def chat(messages, max_tokens):
        return default_llm.chat(messages, SamplingParams(temperature=0, max_tokens=max_tokens))[0].outputs[0]

    return complete, chat


def sse_frames(response: httpx.Response) -> list[str]:
    return [line.removeprefix("data: ") for line in response.iter_lines() if line.startswith("data: ")]


def scrape(http: httpx.Client) -> dict[str, float]:
    """Sample values of /metrics keyed by 'name{labels}' (labels sorted as exposed)."""
    samples = {}
    for line in http.get("/metrics").text.splitlines():
        if line and not line.startswith("#"):
            key, value = line.rsplit(" ", 1)
            samples[key] = float(value)
    return samples


def metric(samples: dict[str, float], name: str, **labels) -> float:
    wanted = {"model_name": MODEL_NAME, **labels}
    for key, value in samples.items():
        metric_name, _, label_text = key.partition("{")
        found = dict(re.findall(r'(\w+)="([^"]*)"', label_text))
        if metric_name == name and found == wanted:
            return value
    raise KeyError(f"{name} {labels} not in /metrics")


# ----- completions -----


def test_completion_of_a_string_equals_the_offline_engine(client, reference):
    complete, _ = reference
    result = client.completions.create(model=MODEL_NAME, prompt="The capital of France is", max_tokens=8, **GREEDY)
    expected = complete("The capital of France is", 8)
    choice = result.choices[0]
    assert choice.text == expected.text
    assert choice.finish_reason == "length"
    assert result.object == "text_completion" and result.id.startswith("cmpl-") and result.model == MODEL_NAME
    assert result.usage.completion_tokens == 8
    assert result.usage.total_tokens == result.usage.prompt_tokens + 8


def test_completion_of_a_list_of_prompts_indexes_choices_by_prompt(client, reference):
    complete, _ = reference
    prompts = ["One, two, three,", "The sky is"]
    result = client.completions.create(model=MODEL_NAME, prompt=prompts, max_tokens=5, n=2, **GREEDY)
    assert [c.index for c in result.choices] == [0, 1, 2, 3]
    for prompt_index, prompt in enumerate(prompts):
        expected = complete(prompt, 5).text
        assert [c.text for c in result.choices[2 * prompt_index: 2 * prompt_index + 2]] == [expected, expected]
    assert result.usage.completion_tokens == 20


def test_completion_of_token_ids_and_echo(client, http):
    ids = http.post("/tokenize", json={"prompt": "Once upon a time"}).json()["tokens"]
    by_ids = client.completions.create(model=MODEL_NAME, prompt=ids, max_tokens=6, echo=True, **GREEDY)
    by_text = client.completions.create(model=MODEL_NAME, prompt="Once upon a time", max_tokens=6, **GREEDY)
    assert by_ids.choices[0].text == "Once upon a time" + by_text.choices[0].text
    assert by_ids.usage.prompt_tokens == len(ids)


def test_completion_logprobs(client):
    result = client.completions.create(model=MODEL_NAME, prompt="The capital of France is", max_tokens=4,
                                       logprobs=3, **GREEDY)
    logprobs = result.choices[0].logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == len(logprobs.top_logprobs) == 4
    assert "".join(logprobs.tokens) == result.choices[0].text
    for logprob, top in zip(logprobs.token_logprobs, logprobs.top_logprobs):
        assert logprob <= 0 and len(top) == 3
        assert max(top.values()) == pytest.approx(logprob, abs=1e-4)  # greedy takes the best token
    assert logprobs.text_offset[0] == 0


def test_stop_string_ends_the_completion_before_it(client):
    free = client.completions.create(model=MODEL_NAME, prompt="The capital of France is", max_tokens=8, **GREEDY)
    words = free.choices[0].text.split()
    stop = words[len(words) // 2]
    stopped = client.completions.create(model=MODEL_NAME, prompt="The capital of France is", max_tokens=8,
                                        stop=[stop], **GREEDY)
    choice = stopped.choices[0]
    assert choice.finish_reason == "stop"
    assert choice.text == free.choices[0].text[: free.choices[0].text.index(stop)]


def test_streamed_completion_equals_the_whole_one(client):
    whole = client.completions.create(model=MODEL_NAME, prompt="Water boils at", max_tokens=8, **GREEDY)
    chunks = list(client.completions.create(model=MODEL_NAME, prompt="Water boils at", max_tokens=8, stream=True,
                                            stream_options={"include_usage": True}, **GREEDY))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 8


# ----- chat -----


def test_multi_turn_chat_equals_the_offline_engine(client, reference):
    _, chat = reference
    messages = [
        {"role": "system", "content": "You are a terse geography tutor."},
        {"role": "user", "content": "What is the capital of Italy?"},
        {"role": "assistant", "content": "Rome."},
        {"role": "user", "content": "And of Spain?"},
    ]
    result = client.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=10, **GREEDY)
    choice = result.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content == chat(messages, 10).text
    assert choice.finish_reason in ("stop", "length")
    assert result.object == "chat.completion" and result.id.startswith("chatcmpl-")


def test_chat_stream_opens_with_the_role_and_ends_with_usage_and_done(server, http, client):
    whole = client.chat.completions.create(model=MODEL_NAME, messages=QUESTION, max_completion_tokens=12, **GREEDY)
    body = {"model": MODEL_NAME, "messages": QUESTION, "max_completion_tokens": 12, "stream": True,
            "stream_options": {"include_usage": True}, **GREEDY}
    with http.stream("POST", "/v1/chat/completions", json=body) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        frames = sse_frames(response)
    assert frames[-1] == "[DONE]"
    chunks = [json.loads(f) for f in frames[:-1]]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == chunks[0]["id"] for c in chunks)
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == whole.choices[0].message.content
    finishing = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    assert finishing == [whole.choices[0].finish_reason]
    assert chunks[-1]["choices"] == []
    counts = ("prompt_tokens", "completion_tokens", "total_tokens")
    assert {k: chunks[-1]["usage"][k] for k in counts} == {k: getattr(whole.usage, k) for k in counts}


def test_chat_stream_with_n_choices_through_the_openai_client(client):
    stream = client.chat.completions.create(model=MODEL_NAME, messages=QUESTION, max_tokens=6, n=2, stream=True,
                                            **GREEDY)
    texts, roles = {0: "", 1: ""}, {}
    for chunk in stream:
        for choice in chunk.choices:
            roles.setdefault(choice.index, choice.delta.role)
            texts[choice.index] += choice.delta.content or ""
    assert roles == {0: "assistant", 1: "assistant"}
    assert texts[0] == texts[1] != ""


def test_chat_content_as_text_parts_equals_content_as_a_string(client):
    as_parts = [{"role": "user", "content": [{"type": "text", "text": "What is the capital "},
                                             {"type": "text", "text": "of France?"}]}]
    by_parts = client.chat.completions.create(model=MODEL_NAME, messages=as_parts, max_tokens=6, **GREEDY)
    by_string = client.chat.completions.create(model=MODEL_NAME, messages=QUESTION, max_tokens=6, **GREEDY)
    assert by_parts.choices[0].message.content == by_string.choices[0].message.content
    assert by_parts.usage.prompt_tokens == by_string.usage.prompt_tokens
    assert by_parts.usage.completion_tokens == by_string.usage.completion_tokens


def test_completion_of_several_token_id_prompts_streams_every_choice(client, http):
    ids = [http.post("/tokenize", json={"prompt": text}).json()["tokens"] for text in ("Red, green,", "Monday,")]
    chunks = list(client.completions.create(model=MODEL_NAME, prompt=ids, max_tokens=3, n=2, stream=True,
                                            stream_options={"include_usage": True}, **GREEDY))
    finished = sorted(c.index for chunk in chunks for c in chunk.choices if c.finish_reason)
    assert finished == [0, 1, 2, 3]
    assert chunks[-1].usage.completion_tokens == 12
    assert chunks[-1].usage.prompt_tokens == len(ids[0]) + len(ids[1])


def test_chat_logprobs(client):
    result = client.chat.completions.create(model=MODEL_NAME, messages=QUESTION, max_tokens=4, logprobs=True,
                                            top_logprobs=2, **GREEDY)
    content = result.choices[0].logprobs.content
    assert "".join(t.token for t in content) == result.choices[0].message.content
    assert all(len(t.top_logprobs) == 2 and t.top_logprobs[0].logprob == pytest.approx(t.logprob, abs=1e-4)
               for t in content)
    assert content[0].bytes == list(content[0].token.encode())


@pytest.mark.slow
def test_32_concurrent_chat_streams_each_equal_their_own_output_alone(server, reference):
    _, chat = reference
    conversations = [[{"role": "user", "content": f"Give me one fact about the number {i}."}] for i in range(32)]
    alone = [chat(messages, 6).text for messages in conversations]
    client = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)

    async def stream(messages) -> str:
        chunks = await client.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=6,
                                                      stream=True, **GREEDY)
        parts = [c.choices[0].delta.content or "" async for c in chunks if c.choices]
        return "".join(parts)

    async def all_streams():
        try:
            return await asyncio.gather(*(stream(m) for m in conversations))
        finally:
            await client.close()

    assert asyncio.run(all_streams()) == alone


def test_request_rope_scaling_is_passed_to_the_engine_and_validated(client, http):
    scaled = client.completions.create(model=MODEL_NAME, prompt="The capital of France is", max_tokens=4,
                                       extra_body={"rope_scaling": {"rope_type": "dynamic", "factor": 2}}, **GREEDY)
    assert scaled.usage.completion_tokens == 4
    bad = http.post("/v1/chat/completions", json={"messages": QUESTION, "rope_scaling": {"rope_type": "bogus"}})
    assert_openai_error(bad, 400, "rope_scaling.rope_type")


@pytest.mark.slow
def test_request_context_policy_streams_past_the_context_limit_and_is_validated(client, http):
    too_long = "The river ran past the old mill and on into the valley. " * 160  # > MAX_MODEL_LEN tokens
    refused = http.post("/v1/completions", json={"prompt": too_long, "max_tokens": 4})
    assert_openai_error(refused, 400, "prompt")
    windowed = client.completions.create(
        model=MODEL_NAME, prompt=too_long, max_tokens=4,
        extra_body={"context_policy": {"type": "sink_window", "sinks": 4, "window": 256}}, **GREEDY)
    assert windowed.usage.prompt_tokens > MAX_MODEL_LEN
    assert windowed.usage.completion_tokens == 4
    # The cache holds sinks (one block) + at most the window, at least the window less one
    # eviction chunk (32), of the tokens computed (all but the last sampled one); the rest were evicted.
    in_cache = windowed.usage.total_tokens - 1 - windowed.usage.ropeway["evicted_tokens"]
    assert 16 + 256 - 32 < in_cache <= 16 + 256
    bad = http.post("/v1/completions", json={"prompt": "hi", "context_policy": {"type": "sink_window", "window": 4}})
    assert_openai_error(bad, 400, "context_policy.window")


@pytest.mark.slow
def test_request_retrieving_landmark_policy_recalls_and_shows_in_metrics(client, http):
    too_long = "The river ran past the old mill and on into the valley. " * 160
    before = scrape(http)
    recalled = client.completions.create(
        model=MODEL_NAME, prompt=too_long, max_tokens=4,
        extra_body={"context_policy": {"type": "landmark", "sinks": 4, "window": 256, "landmarks": 16,
                                       "retrieve": 32}}, **GREEDY)
    assert recalled.usage.completion_tokens == 4
    after = scrape(http)
    # Retrieval re-selects before every prompt chunk past the first eviction: one recall or more,
    # each bringing back up to retrieve / block size = 2 blocks.
    recalls = metric(after, "ropeway:retrieval_recalls_total") - metric(before, "ropeway:retrieval_recalls_total")
    blocks = (metric(after, "ropeway:retrieval_recalled_blocks_total")
              - metric(before, "ropeway:retrieval_recalled_blocks_total"))
    assert recalls >= 1 and 2 <= blocks <= 2 * recalls
    assert metric(after, "ropeway:retrieval_archive_bytes") >= 0
    bad = http.post("/v1/completions", json={"prompt": "hi", "context_policy": {"type": "sink_window", "retrieve": 64}})
    assert_openai_error(bad, 400, "context_policy.retrieve")


def test_usage_counts_prompt_tokens_served_from_the_prefix_cache(client):
    # A system prompt of its own: the template's default one would be cached by earlier tests.
    messages = [{"role": "system", "content": "Rivers only."},
                {"role": "user", "content": "Name three rivers of Europe, please. " * 6}]
    first = client.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=2, **GREEDY)
    again = client.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=2, **GREEDY)
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    # Whole 16-token blocks, and never the last prompt token (it must be computed to sample).
    cached = again.usage.prompt_tokens_details.cached_tokens
    assert cached == (again.usage.prompt_tokens - 1) // 16 * 16 > 0
    assert again.usage.ropeway == {"evicted_tokens": 0}


# ----- other routes -----


def test_models_health_tokenizer_and_docs(http):
    models = http.get("/v1/models").json()
    assert models["object"] == "list"
    assert models["data"][0]["id"] == MODEL_NAME and models["data"][0]["max_model_len"] == MAX_MODEL_LEN
    assert models["data"][0]["trained_context_len"] == 8192  # the GGUF's context_length
    assert models["data"][0]["context_policy"] == {"type": "none", "sinks": 4, "window": 4096, "landmarks": 64,
                                                   "retrieve": 0}
    assert http.get("/health").status_code == 200
    tokens = http.post("/tokenize", json={"prompt": "Hello world"}).json()
    assert tokens["count"] == len(tokens["tokens"]) > 0
    assert http.post("/detokenize", json={"tokens": tokens["tokens"]}).json() == {"prompt": "Hello world"}
    chat_tokens = http.post("/tokenize", json={"messages": QUESTION}).json()
    assert chat_tokens["count"] > tokens["count"]
    assert http.get("/docs").status_code == 200
    assert "/v1/chat/completions" in http.get("/openapi.json").json()["paths"]


# ----- errors -----


def assert_openai_error(response: httpx.Response, status: int, param: str | None = None, says: str = ""):
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert says in error["message"]
    if param is not None:
        assert error["param"] == param
    assert "Traceback" not in response.text


BAD_COMPLETIONS = [
    ({"prompt": "hi", "max_tokens": -1}, "max_tokens", "max_tokens"),
    ({"prompt": "hi", "max_tokens": "many"}, "max_tokens", "integer"),
    ({"prompt": 42}, "prompt", ""),
    ({"prompt": "hi", "temperature": 500}, "temperature", "temperature"),
    ({"prompt": "hi", "top_p": 0}, "top_p", "top_p"),
    ({"prompt": "hi", "n": 100000}, "n", "at most"),
    ({"prompt": "hi", "logprobs": 99}, "logprobs", "logprobs"),
    ({"prompt": []}, "prompt", "empty"),
    ({"prompt": [10**9]}, "prompt", "token ids"),
    ({"prompt": "hi", "suffix": "x"}, "suffix", "not supported"),
    ({"max_tokens": 3}, "prompt", "Field required"),
]


@pytest.mark.parametrize("body, param, says", BAD_COMPLETIONS)
def test_bad_completion_fields_get_400(http, body, param, says):
    assert_openai_error(http.post("/v1/completions", json=body), 400, param, says)


BAD_CHATS = [
    ({"messages": []}, "messages", "at least 1"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages.0.role", ""),
    ({"messages": "hello"}, "messages", ""),
    ({"messages": QUESTION, "max_completion_tokens": 0}, "max_completion_tokens", "at least 1"),
    ({"messages": QUESTION, "temperature": -1}, "temperature", ""),
    ({"messages": QUESTION, "top_logprobs": 2}, "top_logprobs", "logprobs"),
    ({"messages": QUESTION, "n": 10**6}, "n", ""),
]


@pytest.mark.parametrize("body, param, says", BAD_CHATS)
def test_bad_chat_fields_get_400(http, body, param, says):
    assert_openai_error(http.post("/v1/chat/completions", json=body), 400, param, says)


def test_malformed_json_gets_400(http):
    response = http.post("/v1/chat/completions", content=b'{"messages": [',
                         headers={"content-type": "application/json"})
    assert_openai_error(response, 400, says="not valid JSON")
    assert_openai_error(http.post("/v1/completions", json=[1, 2]), 400)


def test_prompt_past_the_context_limit_gets_400_naming_both_lengths(http, client):
    too_long = [1] * MAX_MODEL_LEN
    response = http.post("/v1/completions", json={"prompt": too_long, "max_tokens": 10})
    assert_openai_error(response, 400, "prompt",
                        f"maximum context length is {MAX_MODEL_LEN} tokens; your request has {MAX_MODEL_LEN + 10}")
    streamed = http.post("/v1/chat/completions", json={
        "messages": [{"role": "user", "content": "word " * MAX_MODEL_LEN}], "stream": True})
    assert_openai_error(streamed, 400, "messages", "maximum context length")
    with pytest.raises(openai.BadRequestError, match="maximum context length"):
        client.completions.create(model=MODEL_NAME, prompt=too_long, max_tokens=10)


def test_unknown_model_gets_404(http, client):
    response = http.post("/v1/chat/completions", json={"model": "gpt-9", "messages": QUESTION})
    assert_openai_error(response, 404, "model", "gpt-9")
    assert response.json()["error"]["code"] == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-9", prompt="hi", max_tokens=1)


def test_unknown_route_is_an_openai_error(http):
    assert_openai_error(http.get("/v1/nothing-here"), 404)


def test_server_keeps_serving_after_bad_requests(http, client):
    for body, _, _ in BAD_COMPLETIONS:
        http.post("/v1/completions", json=body)
    assert http.get("/health").status_code == 200
    result = client.completions.create(model=MODEL_NAME, prompt="Still", max_tokens=2, **GREEDY)
    assert result.usage.completion_tokens == 2


def test_api_key_is_required_when_set(engine):
    with RunningServer(engine, api_key="sesame") as keyed, httpx.Client(base_url=keyed.url, timeout=60) as http:
        assert_openai_error(http.get("/v1/models"), 401, says="API key")
        wrong = http.get("/v1/models", headers={"Authorization": "Bearer nope"})
        assert_openai_error(wrong, 401)
        assert wrong.json()["error"]["code"] == "invalid_api_key"
        assert http.get("/v1/models", headers={"Authorization": "Bearer sesame"}).status_code == 200
        assert http.get("/health").status_code == 200  # probes need no key
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{keyed.url}/v1", api_key="nope", max_retries=0).models.list()
        keyed_client = openai.OpenAI(base_url=f"{keyed.url}/v1", api_key="sesame", max_retries=0)
        assert keyed_client.completions.create(model=MODEL_NAME, prompt="Hi", max_tokens=1).choices


def test_full_waiting_queue_gets_503(make_llm):
    """An engine that runs one sequence and lets none wait: a second request is turned away."""
    tiny = AsyncLLM.in_thread(make_llm(max_num_seqs=1, max_num_batched_tokens=64,
                                       kv_cache_memory_bytes=16 << 20).engine)
    tiny.start()
    try:
        with RunningServer(tiny, max_waiting=0) as small, httpx.Client(base_url=small.url, timeout=60) as http:
            body = {"messages": QUESTION, "max_tokens": 200, "stream": True, "ignore_eos": True}
            with http.stream("POST", "/v1/chat/completions", json=body) as first:
                lines = first.iter_lines()  # kept: a dropped line iterator closes the connection
                next(lines)
                second = http.post("/v1/completions", json={"prompt": "hi", "max_tokens": 1})
                assert_openai_error(second, 503, says="capacity")
                assert second.headers["retry-after"] == "1"
            deadline = time.monotonic() + 10
            while small.ctx.gate.in_flight and time.monotonic() < deadline:
                time.sleep(0.05)
            assert http.post("/v1/completions", json={"prompt": "hi", "max_tokens": 1}).status_code == 200
    finally:
        tiny.shutdown()


def test_a_stopped_engine_makes_health_and_requests_503(make_llm):
    stopped = AsyncLLM.in_thread(make_llm(kv_cache_memory_bytes=16 << 20).engine)  # never started
    with RunningServer(stopped) as down, httpx.Client(base_url=down.url, timeout=60) as http:
        assert_openai_error(http.get("/health"), 503)
        assert_openai_error(http.post("/v1/completions", json={"prompt": "hi", "max_tokens": 1}), 503,
                            says="engine is not running")
        streamed = http.post("/v1/chat/completions", json={"messages": QUESTION, "stream": True})
        assert_openai_error(streamed, 503, says="engine is not running")


# ----- disconnects and failures -----


def wait_for(condition, seconds: float = 10.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return False


def request_blocks_in_use(http) -> float:
    """KV bytes held for requests: all in use, less what retained chat sessions hold."""
    metrics = scrape(http)
    return metric(metrics, "ropeway:kv_cache_used_bytes") - metric(metrics, "ropeway:session_store_bytes")


def engine_is_idle(engine) -> bool:
    core = engine.core.core
    return not core.requests and core.block_manager.num_used_blocks == core.scheduler.sessions.num_blocks


def test_client_that_drops_mid_stream_frees_its_blocks(http, engine):
    before = scrape(http)
    aborts_before = metric(before, "ropeway:request_success_total", finished_reason="abort") \
        if any("abort" in k for k in before) else 0.0
    body = {"messages": QUESTION, "max_tokens": 500, "ignore_eos": True, "stream": True}
    with http.stream("POST", "/v1/chat/completions", json=body) as response:
        lines = response.iter_lines()
        for _ in range(8):
            next(lines)
        assert wait_for(lambda: request_blocks_in_use(http) > 0)
    # Closing the response drops the connection; the request is aborted and its blocks freed.
    assert wait_for(lambda: request_blocks_in_use(http) == 0)
    after = scrape(http)
    assert metric(after, "ropeway:num_requests_running") == 0
    assert metric(after, "ropeway:request_success_total", finished_reason="abort") == aborts_before + 1
    assert engine_is_idle(engine)


def test_non_streaming_client_that_gives_up_aborts_its_request(http, engine, server):
    with pytest.raises(httpx.TimeoutException):
        httpx.post(f"{server.url}/v1/completions", json={"prompt": "Tell me a story", "max_tokens": 500,
                                                         "ignore_eos": True}, timeout=1.0)
    assert wait_for(lambda: engine_is_idle(engine))


def test_error_midway_through_a_stream_is_an_error_frame_then_done(http, engine, monkeypatch):
    from ropeway.server import chat

    def failing_chunks(self, outputs):
        async def chunks():
            async for chunk in original(self, outputs):
                yield chunk
                raise RuntimeError("secret internals")
        return chunks()

    original = chat.ChatStream.chunks
    monkeypatch.setattr(chat.ChatStream, "chunks", failing_chunks)
    body = {"messages": QUESTION, "max_tokens": 50, "stream": True}
    with http.stream("POST", "/v1/chat/completions", json=body) as response:
        frames = sse_frames(response)
    assert frames[-1] == "[DONE]"
    error = json.loads(frames[-2])["error"]
    assert error["type"] == "server_error" and "secret" not in error["message"]
    assert json.loads(frames[0])["choices"][0]["delta"]["role"] == "assistant"
    assert wait_for(lambda: not engine.core.core.requests)


def test_unexpected_failure_is_a_500_without_internals(http, monkeypatch):
    from ropeway.server import chat

    def broken(self, final):
        raise RuntimeError("secret internals")

    monkeypatch.setattr(chat.ChatStream, "response", broken)
    response = http.post("/v1/chat/completions", json={"messages": QUESTION, "max_tokens": 2})
    assert_openai_error(response, 500)
    assert "secret" not in response.text
    assert http.get("/health").status_code == 200


# ----- metrics -----


def test_metrics_after_traffic_pass_promtool(http, client):
    # Traffic of its own, so the test stands alone: two choices share (and hit) their prompt's blocks.
    client.completions.create(model=MODEL_NAME,
                              prompt="Once upon a time, in a land far away beyond the seven hills and the "
                                     "seven rivers, there lived",
                              max_tokens=3, n=2, **GREEDY)
    samples = scrape(http)
    assert metric(samples, "ropeway:prompt_tokens_total") > 0
    assert metric(samples, "ropeway:generation_tokens_total") > 0
    assert metric(samples, "ropeway:request_success_total", finished_reason="length") > 0
    assert metric(samples, "ropeway:time_to_first_token_seconds_count") > 0
    assert metric(samples, "ropeway:inter_token_latency_seconds_count") > 0
    assert metric(samples, "ropeway:e2e_request_latency_seconds_count") > 0
    assert metric(samples, "ropeway:request_queue_time_seconds_count") > 0
    assert metric(samples, "ropeway:prefix_cache_hits_total") > 0  # n=2 choices share their prompt
    assert metric(samples, "ropeway:kv_cache_capacity_blocks") > 0
    assert metric(samples, "ropeway:kv_cache_info", kv_cache_dtype="float32", block_size="16") == 1
    for name in ("ropeway:num_requests_waiting", "ropeway:num_preemptions_total", "ropeway:kv_cache_capacity_bytes",
                 "ropeway:request_prompt_tokens_count", "ropeway:request_generation_tokens_count",
                 "ropeway:prefix_cache_queries_total", "ropeway:kv_cache_used_bytes"):
        metric(samples, name)

    if shutil.which("promtool") is None:
        if os.environ.get("CI"):
            pytest.fail("promtool is missing: apt-get install -y --no-install-recommends prometheus")
        pytest.skip("promtool is not installed")
    checked = subprocess.run(["promtool", "check", "metrics"], input=http.get("/metrics").content,
                             capture_output=True)
    problems = [line for line in (checked.stdout + checked.stderr).decode().splitlines() if line.strip()]
    # Prometheus reserves ':' for recording rules and promtool's linter says so for every name;
    # the `ropeway:` prefix follows vLLM's `vllm:` names on purpose. Anything else must be clean.
    other = [p for p in problems if not p.endswith("metric names should not contain ':'")]
    assert checked.returncode in (0, 3) and not other, problems
