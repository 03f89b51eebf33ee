"""OpenAI API fidelity (issue 18): what real clients (the openai SDK, sync and async, and
httpx with raw bodies) rely on, checked on a real server on the default model. Every
response here is also checked against OpenAI's pinned OpenAPI spec (conftest.py)."""

import asyncio
import json

import httpx
import openai
import pytest
import torch
from openai_spec import SPEC
from server_harness import MODEL_NAME, openai_client, serving
from test_server import GREEDY, QUESTION, assert_openai_error, sse_frames

from ropeway.server.protocol import ChatCompletionRequest, CompletionRequest
from ropeway.server.unsupported_fields import NO_EFFECT, REFUSED_CHAT_FIELDS

PROMPT = "The quick brown fox jumps over the lazy dog because"


@pytest.fixture(scope="module")
def server(make_llm):
    with serving(make_llm(max_model_len=1024, max_num_seqs=8, kv_cache_memory_bytes=128 << 20)) as running:
        yield running


@pytest.fixture(scope="module")
def client(server):
    return openai_client(server)


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=60) as session:
        yield session


def tokenize(http, text: str) -> list[int]:
    return http.post("/tokenize", json={"prompt": text}).json()["tokens"]


def spec_properties(schema_name: str) -> dict:
    """A request schema's properties, its allOf parts (by $ref) merged."""
    schemas = SPEC["components"]["schemas"]
    found = {}
    for part in schemas[schema_name].get("allOf", [schemas[schema_name]]):
        if "$ref" in part:
            found.update(spec_properties(part["$ref"].rsplit("/", 1)[-1]))
        else:
            found.update(part.get("properties", {}))
    return found


def allows_null(schema: dict) -> bool:
    if schema.get("type") == "null" or "null" in (schema.get("type") or []):
        return True
    return any(allows_null(option) for option in schema.get("anyOf", []) + schema.get("oneOf", []))


# ----- streams: one choice per chunk -----


def test_completion_stream_with_n_sends_one_choice_per_chunk_each_with_its_own_finish(client):
    chunks = list(client.completions.create(model=MODEL_NAME, prompt=["Red, green,", "One, two,"], max_tokens=4,
                                            n=2, stream=True, **GREEDY))
    assert all(len(chunk.choices) == 1 for chunk in chunks)
    finishes = [chunk.choices[0].index for chunk in chunks if chunk.choices[0].finish_reason]
    assert sorted(finishes) == [0, 1, 2, 3]
    texts = {}
    for chunk in chunks:
        texts[chunk.choices[0].index] = texts.get(chunk.choices[0].index, "") + chunk.choices[0].text
    whole = client.completions.create(model=MODEL_NAME, prompt=["Red, green,", "One, two,"], max_tokens=4, n=2,
                                      **GREEDY)
    assert texts == {c.index: c.text for c in whole.choices}


def test_async_chat_stream_with_n_sends_one_choice_per_chunk(server):
    async def read() -> list:
        async with openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0) as client:
            stream = await client.chat.completions.create(model=MODEL_NAME, messages=QUESTION, max_tokens=5, n=3,
                                                          stream=True, **GREEDY)
            return [chunk async for chunk in stream]

    chunks = asyncio.run(read())
    assert all(len(chunk.choices) == 1 for chunk in chunks)
    assert sorted(c.choices[0].index for c in chunks if c.choices[0].finish_reason) == [0, 1, 2]
    assert sorted(c.choices[0].index for c in chunks if c.choices[0].delta.role == "assistant") == [0, 1, 2]


# ----- completion logprobs -----


def test_completion_top_logprobs_always_hold_the_sampled_token(client):
    none_asked = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=6, logprobs=0, **GREEDY)
    lp = none_asked.choices[0].logprobs
    assert [list(top) for top in lp.top_logprobs] == [[token] for token in lp.tokens]
    assert [top[token] for top, token in zip(lp.top_logprobs, lp.tokens)] == lp.token_logprobs
    # Sampled at a high temperature, tokens fall outside the top 1: they still appear, beside it.
    sampled = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=24, logprobs=1, temperature=5,
                                        seed=7)
    lp = sampled.choices[0].logprobs
    assert all(token in top and 1 <= len(top) <= 2 for top, token in zip(lp.top_logprobs, lp.tokens))
    assert any(len(top) == 2 for top in lp.top_logprobs)  # at temperature 5 some token is not the likeliest
    for top, token, logprob in zip(lp.top_logprobs, lp.tokens, lp.token_logprobs):
        assert top[token] == logprob and max(top.values()) >= logprob


def test_return_tokens_as_token_ids_names_tokens_by_id(client, http):
    plain = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=4, logprobs=2, **GREEDY)
    by_id = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=4, logprobs=2, **GREEDY,
                                      extra_body={"return_tokens_as_token_ids": True})
    ids = [int(token.removeprefix("token_id:")) for token in by_id.choices[0].logprobs.tokens]
    assert [http.post("/detokenize", json={"tokens": [i]}).json()["prompt"] for i in ids] == \
        plain.choices[0].logprobs.tokens
    assert by_id.choices[0].text == plain.choices[0].text
    chat = client.chat.completions.create(model=MODEL_NAME, messages=QUESTION, max_tokens=3, logprobs=True,
                                          top_logprobs=2, extra_body={"return_tokens_as_token_ids": True}, **GREEDY)
    assert all(t.token.startswith("token_id:") and all(o.token.startswith("token_id:") for o in t.top_logprobs)
               for t in chat.choices[0].logprobs.content)


# ----- prompt logprobs: echo, max_tokens 0, vLLM's prompt_logprobs -----


def transformers_prompt_logprobs(hf_default, ids: list[int]) -> torch.Tensor:
    """[len(ids) - 1, vocab]: log p(next token | tokens before), by transformers."""
    model, _ = hf_default
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().log_softmax(-1)[:-1]


@pytest.mark.slow
def test_echo_with_logprobs_and_no_completion_scores_the_prompt_as_transformers_does(client, http, hf_default):
    ids = tokenize(http, PROMPT)
    result = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=0, echo=True, logprobs=3)
    choice = result.choices[0]
    assert choice.text == PROMPT and choice.finish_reason == "length"
    assert result.usage.completion_tokens == 0 and result.usage.prompt_tokens == len(ids)
    lp = choice.logprobs
    assert len(lp.tokens) == len(ids) and "".join(lp.tokens) == PROMPT
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    reference = transformers_prompt_logprobs(hf_default, ids)
    expected = reference.gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
    assert torch.allclose(torch.tensor(lp.token_logprobs[1:]), expected, atol=1e-3)
    for position, top in enumerate(lp.top_logprobs[1:]):
        assert lp.tokens[position + 1] in top and 3 <= len(top) <= 4
        best = sorted(top.values(), reverse=True)[:3]
        assert torch.allclose(torch.tensor(best), reference[position].topk(3).values, atol=1e-3)


def test_echo_with_logprobs_and_a_completion_scores_both(client):
    scored = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=3, echo=True, logprobs=1,
                                       **GREEDY)
    plain = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=3, logprobs=1, **GREEDY)
    lp, generated = scored.choices[0].logprobs, plain.choices[0].logprobs
    assert scored.choices[0].text == PROMPT + plain.choices[0].text
    assert lp.tokens[-3:] == generated.tokens
    assert lp.token_logprobs[-3:] == pytest.approx(generated.token_logprobs, abs=1e-4)
    assert lp.text_offset[-3] == len(PROMPT)
    streamed = list(client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=3, echo=True, logprobs=1,
                                              stream=True, **GREEDY))
    assert "".join(c.choices[0].text for c in streamed) == scored.choices[0].text
    assert sum((c.choices[0].logprobs.token_logprobs for c in streamed), []) == \
        pytest.approx(lp.token_logprobs, abs=1e-4)


def test_vllm_prompt_logprobs_field_in_completions_and_chat(http, client):
    ids = tokenize(http, PROMPT)
    echo = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=0, echo=True, logprobs=2)
    body = {"model": MODEL_NAME, "prompt": PROMPT, "max_tokens": 0, "prompt_logprobs": 2}
    vllm = http.post("/v1/completions", json=body).json()
    entries = vllm["choices"][0]["prompt_logprobs"]
    assert entries[0] is None and len(entries) == len(ids)
    for position, entry in enumerate(entries[1:], start=1):
        own = entry[str(ids[position])]
        assert own["logprob"] == pytest.approx(echo.choices[0].logprobs.token_logprobs[position], abs=1e-5)
        ranked = sorted((e for e in entry.values() if e["rank"] is not None), key=lambda e: e["rank"])
        assert [e["rank"] for e in ranked] == [1, 2]
        assert ranked[0]["logprob"] >= ranked[1]["logprob"] >= own["logprob"] or own["rank"] is not None
    chat = http.post("/v1/chat/completions", json={"messages": QUESTION, "max_tokens": 1, "prompt_logprobs": 0})
    chat_entries = chat.json()["prompt_logprobs"]
    assert chat_entries[0] is None and len(chat_entries) == chat.json()["usage"]["prompt_tokens"]
    assert all(len(entry) == 1 for entry in chat_entries[1:])


@pytest.mark.parametrize("body, param", [
    ({"prompt": "hi", "max_tokens": 0}, "max_tokens"),
    ({"prompt": "hi", "prompt_logprobs": 2, "stream": True}, "prompt_logprobs"),
    ({"prompt": "hi", "prompt_logprobs": 21}, "prompt_logprobs"),
])
def test_prompt_scoring_limits_get_400(http, body, param):
    assert_openai_error(http.post("/v1/completions", json=body), 400, param)


# ----- usage -----


def test_usage_reports_prefix_cache_hits_as_cached_tokens(client):
    prompt = "A long shared preamble that the prefix cache keeps, block after block, for the next request. " * 4
    first = client.completions.create(model=MODEL_NAME, prompt=prompt + "First", max_tokens=2, **GREEDY)
    again = client.completions.create(model=MODEL_NAME, prompt=prompt + "Second", max_tokens=2, **GREEDY)
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    cached = again.usage.prompt_tokens_details.cached_tokens
    assert cached > 0 and cached % 16 == 0 and cached < again.usage.prompt_tokens
    streamed = list(client.completions.create(model=MODEL_NAME, prompt=prompt + "Third", max_tokens=2, stream=True,
                                              stream_options={"include_usage": True}, **GREEDY))
    assert streamed[-1].usage.prompt_tokens_details.cached_tokens == cached
    messages = [{"role": "user", "content": prompt}]
    client.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=1, **GREEDY)
    chat = client.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=1, **GREEDY)
    assert chat.usage.prompt_tokens_details.cached_tokens > 0


# ----- models -----


def test_models_retrieve_returns_the_model_and_an_openai_404_for_others(client, http):
    model = client.models.retrieve(MODEL_NAME)
    assert model.id == MODEL_NAME and model.object == "model"
    with pytest.raises(openai.NotFoundError) as raised:
        client.models.retrieve("gpt-9")
    assert raised.value.body["code"] == "model_not_found"
    assert_openai_error(http.get("/v1/models/org/gpt-9"), 404, "model")


# ----- request fields: nulls, refusals, validation -----


NULLABLE_COMPLETION_FIELDS = sorted(name for name, schema in spec_properties("CreateCompletionRequest").items()
                                    if allows_null(schema) and name != "prompt")
NULLABLE_CHAT_FIELDS = sorted(name for name, schema in spec_properties("CreateChatCompletionRequest").items()
                              if allows_null(schema))


def test_explicit_null_in_every_nullable_field_means_unset(http):
    """The spec's nullable fields, sent as null all at once through raw httpx: the reply is
    the one without them."""
    assert {"n", "max_tokens", "logprobs", "echo", "seed", "stream", "temperature"} <= set(NULLABLE_COMPLETION_FIELDS)
    base = {"model": MODEL_NAME, "prompt": PROMPT, "max_tokens": 4, "temperature": 0}
    expected = http.post("/v1/completions", json=base).json()["choices"][0]["text"]
    nulls = {name: None for name in NULLABLE_COMPLETION_FIELDS if name not in base}
    with_nulls = http.post("/v1/completions", json={**base, **nulls, "stop": None, "user": None})
    assert with_nulls.status_code == 200, with_nulls.text
    assert with_nulls.json()["choices"][0]["text"] == expected
    chat_base = {"model": MODEL_NAME, "messages": QUESTION, "max_tokens": 4, "temperature": 0}
    chat_expected = http.post("/v1/chat/completions", json=chat_base).json()["choices"][0]["message"]
    chat_nulls = {name: None for name in NULLABLE_CHAT_FIELDS if name not in chat_base}
    chat = http.post("/v1/chat/completions", json={**chat_base, **chat_nulls, "stream_options": None})
    assert chat.status_code == 200, chat.text
    assert chat.json()["choices"][0]["message"] == chat_expected
    assert_openai_error(http.post("/v1/completions", json={"prompt": None}), 400, "prompt", "required")


@pytest.mark.parametrize("schema_name, request_class, refused", [
    ("CreateCompletionRequest", CompletionRequest, ()),
    ("CreateChatCompletionRequest", ChatCompletionRequest, REFUSED_CHAT_FIELDS),
])
def test_every_openai_request_field_is_handled_or_refused(schema_name, request_class, refused):
    """Each field of OpenAI's request schema is a field ropeway acts on, refused by name, or a
    documented no-op (unsupported_fields.py): none is left to silent ignoring."""
    known = set(request_class.model_fields) | set(refused) | set(NO_EFFECT)
    assert set(spec_properties(schema_name)) - known == set()


REFUSALS = [
    ({"functions": [{"name": "f"}]}, "functions"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}}},
     "response_format.json_schema.schema"),
    ({"store": True}, "store"),
    ({"service_tier": "flex"}, "service_tier"),
    ({"stream_options": {"include_usage": True}}, "stream_options"),
    ({"stream": False, "stream_options": {"include_usage": True}}, "stream_options"),
    ({"stop_token_ids": [49152]}, "stop_token_ids"),
    ({"logit_bias": {"hello": 5}}, "logit_bias"),
    ({"logit_bias": {"49152": 5}}, "logit_bias"),
    ({"logit_bias": {"42": 101}}, "logit_bias"),
    ({"min_tokens": -1}, "min_tokens"),
    ({"max_tokens": 4, "min_tokens": 5}, "min_tokens"),
    ({"truncate_prompt_tokens": 0}, "truncate_prompt_tokens"),
    ({"continue_final_message": True}, "continue_final_message"),  # needs add_generation_prompt false
    ({"continue_final_message": True, "add_generation_prompt": False}, "continue_final_message"),  # last: user
]


@pytest.mark.parametrize("fields, param", REFUSALS)
def test_fields_that_cannot_be_honoured_get_400_naming_them(http, fields, param):
    response = http.post("/v1/chat/completions", json={"messages": QUESTION, "max_tokens": 2, **fields})
    assert_openai_error(response, 400, param)


def test_no_effect_fields_are_accepted(client):
    result = client.chat.completions.create(model=MODEL_NAME, messages=QUESTION, max_tokens=2, store=False,
                                            metadata={"team": "eval"}, service_tier="auto", user="u-1",
                                            response_format={"type": "text"}, modalities=["text"], tool_choice="none",
                                            extra_body={"safety_identifier": "s", "prompt_cache_key": "k"}, **GREEDY)
    assert result.usage.completion_tokens == 2


# ----- vLLM's extra fields -----


def test_truncate_prompt_tokens_keeps_the_prompt_tail(client, http):
    ids = tokenize(http, PROMPT)
    truncated = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=4, echo=True,
                                          extra_body={"truncate_prompt_tokens": 5}, **GREEDY)
    tail = client.completions.create(model=MODEL_NAME, prompt=ids[-5:], max_tokens=4, echo=True, **GREEDY)
    assert truncated.usage.prompt_tokens == 5
    assert truncated.choices[0].text == tail.choices[0].text
    whole = client.chat.completions.create(model=MODEL_NAME, messages=QUESTION, max_tokens=1, **GREEDY)
    cut = client.chat.completions.create(model=MODEL_NAME, messages=QUESTION, max_tokens=1,
                                         extra_body={"truncate_prompt_tokens": 7}, **GREEDY)
    assert cut.usage.prompt_tokens == 7 < whole.usage.prompt_tokens


def test_continue_final_message_and_add_generation_prompt_follow_transformers_templates(client, hf_default):
    _, hf_tokenizer = hf_default
    started = [*QUESTION, {"role": "assistant", "content": "The capital of France is"}]
    continued = client.chat.completions.create(
        model=MODEL_NAME, messages=started, max_tokens=6,
        extra_body={"continue_final_message": True, "add_generation_prompt": False}, **GREEDY)
    prompt = hf_tokenizer.apply_chat_template(started, continue_final_message=True, tokenize=False)
    assert prompt.endswith("The capital of France is")
    expected = client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=6, **GREEDY)
    assert continued.choices[0].message.content == expected.choices[0].text
    assert continued.usage.prompt_tokens == expected.usage.prompt_tokens
    bare = client.chat.completions.create(model=MODEL_NAME, messages=QUESTION, max_tokens=1,
                                          extra_body={"add_generation_prompt": False}, **GREEDY)
    bare_prompt = hf_tokenizer.apply_chat_template(QUESTION, add_generation_prompt=False, tokenize=False)
    assert bare.usage.prompt_tokens == len(hf_tokenizer(bare_prompt, add_special_tokens=False)["input_ids"])


def test_min_tokens_holds_off_eos(client):
    free = client.chat.completions.create(model=MODEL_NAME, messages=QUESTION, max_tokens=60, **GREEDY)
    assert free.choices[0].finish_reason == "stop"
    floor = free.usage.completion_tokens + 5
    held = client.chat.completions.create(model=MODEL_NAME, messages=QUESTION, max_tokens=60,
                                          extra_body={"min_tokens": floor}, **GREEDY)
    assert held.usage.completion_tokens >= floor


def test_logit_bias_moves_greedy_choices(client, http):
    def token_ids(**options) -> list[int]:
        result = client.completions.create(model=MODEL_NAME, prompt=PROMPT, logprobs=0, **GREEDY,
                                           extra_body={"return_tokens_as_token_ids": True}, **options)
        return [int(token.removeprefix("token_id:")) for token in result.choices[0].logprobs.tokens]

    favourite = token_ids(max_tokens=1)[0]
    assert token_ids(max_tokens=1, logit_bias={str(favourite): -100})[0] != favourite
    forced = tokenize(http, " zebra")[0]
    assert token_ids(max_tokens=3, logit_bias={str(forced): 100}) == [forced] * 3


def test_error_frames_and_chunks_of_a_stream_parse(http):
    """Raw SSE through httpx: every frame is JSON (the spec check validates each) and the
    stream ends with [DONE]."""
    body = {"prompt": PROMPT, "max_tokens": 3, "n": 2, "stream": True, "stream_options": {"include_usage": True}}
    with http.stream("POST", "/v1/completions", json=body) as response:
        frames = sse_frames(response)
    assert frames[-1] == "[DONE]"
    chunks = [json.loads(frame) for frame in frames[:-1]]
    assert [len(c["choices"]) for c in chunks[:-1]] == [1] * (len(chunks) - 1)
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 6
