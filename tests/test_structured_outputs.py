"""Structured outputs (issue 17): JSON schemas, regexes, choices and grammars through llguidance,
on the default model; the API through a real server and the official openai client."""

import asyncio
import json
import math
import pathlib
import re

import jsonschema
import openai
import pytest
import torch
from server_harness import MODEL_NAME, openai_client, serving

from ropeway import SamplingParams
from ropeway.engine.sampler import GrammarMask, SamplingRow, sample
from ropeway.structured_outputs import StructuredOutputs

SCHEMAS = json.loads((pathlib.Path(__file__).parent / "data" / "json_schemas.json").read_text())
FORMATS = jsonschema.Draft202012Validator.FORMAT_CHECKER
# Every schema's longest valid document fits in this (strings and arrays are bounded), but for the
# recursive ones, whose prompt asks for a shallow example (suite_prompt).
SUITE_MAX_TOKENS = 128


def suite_prompt(schema: dict) -> str:
    """A recursive schema carries a shallow example: greedy decoding of a small model otherwise
    nests until max_tokens, and the prompt asks for the example's depth."""
    if "examples" in schema:
        return f"Reply with a JSON {schema['title']}, like {json.dumps(schema['examples'][0])}."
    return f"Reply with a JSON {schema['title']}."


def assert_valid(text: str, schema: dict) -> None:
    jsonschema.validate(json.loads(text), schema, format_checker=FORMATS)


# ----- the sampler's masked path against plain torch -----


def reference_mask(logits: torch.Tensor, bitmask: torch.Tensor) -> torch.Tensor:
    """-inf wherever bit (token % 32) of word (token // 32) is 0, one token at a time."""
    masked = logits.clone()
    for row in range(logits.shape[0]):
        for token in range(logits.shape[1]):
            if not (int(bitmask[row, token // 32]) >> (token % 32)) & 1:
                masked[row, token] = float("-inf")
    return masked


def test_masked_sampling_equals_sampling_the_masked_logits_in_plain_torch():
    """Greedy, sampled (seeded) and logprob rows of a batch where two of four rows are constrained:
    tokens and logprobs equal those of plain-torch masked logits sampled without a mask."""
    generator = torch.Generator().manual_seed(0)
    vocab = 200  # not a multiple of 32: the last word's spare bits are ignored
    logits = torch.randn(4, vocab, generator=generator) * 3
    bitmask = torch.randint(-2**31, 2**31 - 1, (2, 7), generator=generator, dtype=torch.int64).to(torch.int32)
    rows = [SamplingRow(SamplingParams(temperature=t, top_p=p, logprobs=3), seed=i, step=i)
            for i, (t, p) in enumerate([(0.0, 1.0), (1.0, 0.9), (0.7, 1.0), (1.0, 1.0)])]
    constrained = torch.tensor([1, 3])
    masked = logits.clone()
    masked[constrained] = reference_mask(logits[constrained], bitmask)

    got = sample(logits, rows, grammar=GrammarMask(constrained, bitmask)).read()
    want = sample(masked, rows).read()
    assert got == want
    for row in constrained.tolist():
        assert masked[row, got.token_ids[row]] > float("-inf")
        assert got.logprobs[row] == pytest.approx(masked[row].log_softmax(-1)[got.token_ids[row]].item())


# ----- offline -----


def test_unconstrained_request_in_a_mixed_batch_keeps_its_greedy_tokens(make_llm):
    """Asynchronous scheduling reads the in-flight step early for constrained rows; a plain greedy
    request batched with them gets the tokens it gets alone."""
    llm = make_llm(async_scheduling=True)
    plain = SamplingParams(temperature=0, max_tokens=16)
    alone = llm.generate(["The history of Paris"], plain, use_tqdm=False)[0].outputs[0].token_ids
    short = [schema for schema in SCHEMAS if schema["title"] in ("boolean flag", "color enum", "top-level integer")]
    constrained = [SamplingParams(temperature=0, max_tokens=16,
                                  structured_outputs=StructuredOutputs(json=json.dumps(schema)))
                   for schema in short]
    outputs = llm.generate(["The history of Paris"] + ["A JSON example:"] * 3, [plain] + constrained,
                           use_tqdm=False)
    assert outputs[0].outputs[0].token_ids == alone
    for schema, output in zip(short, outputs[1:]):
        assert output.outputs[0].finish_reason == "stop"
        assert_valid(output.outputs[0].text, schema)


@pytest.mark.slow
def test_preempted_constrained_requests_replay_their_grammar(make_llm, default_llm):
    """In a pool too small for all of them, constrained sequences are preempted, recomputed, and
    still produce what they produce undisturbed (greedy), each valid; every matcher released."""
    schema = {"type": "object", "properties": {"words": {"type": "array", "minItems": 6, "maxItems": 6,
                                                         "items": {"type": "string", "pattern": "^[a-z]{4,6}$"}}},
              "required": ["words"], "additionalProperties": False}
    prompts = [f"Write six lowercase words about a {animal}, in a JSON object whose one key, words, holds the list:"
               for animal in ("cat", "dog", "fox")]
    # Each ~22-token prompt and its ~20-token output pass 32 tokens (3 blocks) in a pool of 6 blocks.
    params = SamplingParams(temperature=0, max_tokens=40, structured_outputs=StructuredOutputs(json=json.dumps(schema)))
    calm = make_llm().generate(prompts, params, use_tqdm=False)
    tight = make_llm(kv_cache_memory_bytes=6 * default_llm.engine.pool.bytes_per_block,
                     max_num_batched_tokens=64, prefill_chunk_size=32, max_num_seqs=3)
    pressed = tight.generate(prompts, params, use_tqdm=False)
    assert tight.engine.scheduler.num_preemptions > 0
    assert [o.outputs[0].token_ids for o in pressed] == [o.outputs[0].token_ids for o in calm]
    for output in pressed:
        assert_valid(output.outputs[0].text, schema)
    assert tight.engine.core.grammar_masks.matchers == {}


def test_max_tokens_before_the_grammar_completes_finishes_with_length(default_llm):
    params = SamplingParams(temperature=0, max_tokens=3, structured_outputs=StructuredOutputs(regex="[a-z]{20}"))
    output = default_llm.generate(["Letters:"], params, use_tqdm=False)[0].outputs[0]
    assert output.finish_reason == "length"
    assert len(output.token_ids) == 3 and output.text.isalpha() and output.text.islower()


# ----- the server -----


@pytest.fixture(scope="module")
def server(make_llm):
    with serving(make_llm(max_model_len=1024, max_num_seqs=64, kv_cache_memory_bytes=256 << 20,
                          async_scheduling=True)) as running:
        yield running


@pytest.fixture(scope="module")
def client(server):
    return openai_client(server)


@pytest.mark.slow
def test_schema_suite_through_the_server_all_valid(server):
    """The 52 schemas of tests/data at once (the engine batches them): greedy and sampled,
    streamed and not, chat with response_format; every output parses and validates."""
    aclient = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)

    async def one(index: int, schema: dict) -> tuple[str, str]:
        sampled, streamed = index % 2 == 1, index % 4 >= 2
        options = dict(model=MODEL_NAME, max_tokens=SUITE_MAX_TOKENS, seed=index,
                       temperature=0.8 if sampled else 0.0,
                       messages=[{"role": "user", "content": suite_prompt(schema)}],
                       response_format={"type": "json_schema", "json_schema": {"name": "answer", "schema": schema,
                                                                               "strict": True}})
        if not streamed:
            choice = (await aclient.chat.completions.create(**options)).choices[0]
            return choice.message.content, choice.finish_reason
        text, finish = "", None
        async for chunk in await aclient.chat.completions.create(stream=True, **options):
            if chunk.choices:
                text += chunk.choices[0].delta.content or ""
                finish = chunk.choices[0].finish_reason or finish
        return text, finish

    async def run_all():
        try:
            return await asyncio.gather(*(one(i, schema) for i, schema in enumerate(SCHEMAS)))
        finally:
            await aclient.close()

    results = asyncio.run(run_all())
    failures = []
    for schema, (text, finish) in zip(SCHEMAS, results):
        try:
            assert finish == "stop", f"finish_reason {finish}"
            assert_valid(text, schema)
        except (AssertionError, ValueError, jsonschema.ValidationError) as error:
            failures.append(f"{schema['title']}: {str(error)[:200]} in {text[:200]!r}")
    assert not failures, "\n".join(failures)


def test_regex_choice_grammar_and_json_object_through_structured_outputs(client):
    def complete(constraint: dict, prompt: str, max_tokens: int = 32) -> openai.types.CompletionChoice:
        return client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=max_tokens, temperature=0,
                                         extra_body={"structured_outputs": constraint}).choices[0]

    code = complete({"regex": "[A-Z]{3}-[0-9]{4}"}, "A ticket code:")
    assert re.fullmatch("[A-Z]{3}-[0-9]{4}", code.text) and code.finish_reason == "stop"
    answer = complete({"choice": ["Paris", "London", "Rome"]}, "The capital of France is")
    assert answer.text in ("Paris", "London", "Rome") and answer.finish_reason == "stop"
    gbnf = 'root ::= "(" digit ("+" digit)* ")"\ndigit ::= [1-9]'
    sum_ = complete({"grammar": gbnf}, "A sum of digits:")
    assert re.fullmatch(r"\([1-9](\+[1-9])*\)", sum_.text) and sum_.finish_reason == "stop"
    anything = complete({"json_object": True}, 'Reply with {"ok": true}:', max_tokens=48)
    assert anything.finish_reason == "stop" and isinstance(json.loads(anything.text), dict)
    chat = client.chat.completions.create(model=MODEL_NAME, max_tokens=48, temperature=0,
                                          messages=[{"role": "user", "content": 'Reply with {"ok": true}'}],
                                          response_format={"type": "json_object"})
    assert isinstance(json.loads(chat.choices[0].message.content), dict)


def test_n_choices_and_stop_strings_with_a_constraint(client):
    choices = ["apple", "banana", "cherry"]
    reply = client.completions.create(model=MODEL_NAME, prompt="A fruit:", max_tokens=8, temperature=1.0, n=4, seed=3,
                                      extra_body={"structured_outputs": {"choice": choices}})
    assert len(reply.choices) == 4 and all(c.text in choices for c in reply.choices)
    # A stop string ends a constrained output early (it may then not match: documented).
    cut = client.completions.create(model=MODEL_NAME, prompt="Letters:", max_tokens=16, temperature=0, stop=[","],
                                    extra_body={"structured_outputs": {"regex": "abc,def"}})
    assert cut.choices[0].text == "abc" and cut.choices[0].finish_reason == "stop"


def test_constrained_logprobs_cover_only_allowed_tokens(client):
    reply = client.chat.completions.create(model=MODEL_NAME, max_tokens=4, temperature=0, logprobs=True,
                                           top_logprobs=5, messages=[{"role": "user", "content": "Yes or no?"}],
                                           extra_body={"structured_outputs": {"choice": ["yes", "no"]}})
    first = reply.choices[0].logprobs.content[0]
    assert reply.choices[0].message.content in ("yes", "no")
    # Only the tokens the grammar allows at the first step (here "yes", "no" and their prefixes).
    assert all(top.token in ("yes", "no", "y", "n", "ye") for top in first.top_logprobs)
    total = sum(math.exp(top.logprob) for top in first.top_logprobs)
    assert total == pytest.approx(1.0, abs=1e-3)  # renormalized over the allowed tokens


@pytest.mark.parametrize("body, param", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}}},
     "response_format.json_schema.schema"),
    ({"response_format": {"type": "json_schema"}}, "response_format.json_schema"),
    ({"structured_outputs": {"regex": "(unclosed"}}, "structured_outputs.regex"),
    ({"structured_outputs": {"grammar": "root ::= missing_rule"}}, "structured_outputs.grammar"),
    ({"structured_outputs": {"json": "{not json"}}, "structured_outputs.json"),
    ({"structured_outputs": {"json": {"$ref": "#/nowhere"}}}, "structured_outputs.json"),
    ({"structured_outputs": {"json": {"type": "array", "uniqueItems": True}}}, "structured_outputs.json"),
    ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, "structured_outputs"),
    ({"structured_outputs": {}}, "structured_outputs"),
    ({"structured_outputs": {"choice": []}}, "structured_outputs.choice"),
    ({"structured_outputs": {"regex": "a", "whitespace_pattern": " "}}, "structured_outputs.whitespace_pattern"),
    ({"structured_outputs": {"regex": "a"}, "response_format": {"type": "json_object"}}, "structured_outputs"),
    ({"structured_outputs": {"regex": "a"}, "ignore_eos": True}, "ignore_eos"),
    ({"structured_outputs": {"regex": "a"}, "min_tokens": 2}, "min_tokens"),
])
@pytest.mark.parametrize("stream", [False, True])
def test_constraints_that_cannot_run_get_a_400_naming_the_field(client, body, param, stream):
    with pytest.raises(openai.BadRequestError) as raised:
        client.chat.completions.create(model=MODEL_NAME, max_tokens=8, stream=stream,
                                       messages=[{"role": "user", "content": "Hi"}], extra_body=body)
    assert raised.value.status_code == 400
    assert raised.value.body["param"] == param, raised.value.body


def test_scoring_the_prompt_only_refuses_a_constraint(client):
    with pytest.raises(openai.BadRequestError) as raised:
        client.completions.create(model=MODEL_NAME, prompt="Hi", max_tokens=0, echo=True,
                                  extra_body={"structured_outputs": {"regex": "a"}})
    assert raised.value.body["param"] == "max_tokens"
