"""Tool calls parsed from replies (ropeway/server/tool_call_parser.py) and streamed in pieces
(tool_call_stream.py): both formats models write, the two constrained ones, and streams split at
every point, whose pieces must add up to exactly the whole reply's message."""

import json

import pytest

from ropeway.server.tool_call_parser import CallDraft, FreeTextToolCalls, NamedToolCall, RequiredToolCalls
from ropeway.server.tool_call_stream import ToolCallReader

NAMES = frozenset({"get_weather", "get_time"})
WEATHER = '{"city": "Paris", "unit": "celsius", "note": "a } and a \\" inside"}'

FREE_TEXT_CASES = [
    # (reply, content, [(name, arguments)])
    ("The capital of France is Paris.", "The capital of France is Paris.", []),
    (f'<tool_call>\n{{"name": "get_weather", "arguments": {WEATHER}}}\n</tool_call>', "",
     [("get_weather", WEATHER)]),
    (f'Let me look.\n<tool_call>\n{{"name": "get_weather", "arguments": {WEATHER}}}\n</tool_call>\n'
     '<tool_call>{"arguments": {}, "name": "get_time"}</tool_call>\nDone.', "Let me look.Done.",
     [("get_weather", WEATHER), ("get_time", "{}")]),
    # Llama 3.x: JSON calls at the start, "parameters" for the arguments, ';' between calls.
    (f'{{"name": "get_weather", "parameters": {WEATHER}}}', "", [("get_weather", WEATHER)]),
    (f'<|python_tag|>{{"name": "get_weather", "parameters": {WEATHER}}}; {{"name": "get_time", "parameters": {{}}}}',
     "", [("get_weather", WEATHER), ("get_time", "{}")]),
    # A call with no arguments at all takes none.
    ('{"name": "get_time"}', "", [("get_time", "{}")]),
    # JSON that is not a call of a declared tool stays text, as does a block that holds none.
    ('{"name": "launch_rocket", "parameters": {}}', '{"name": "launch_rocket", "parameters": {}}', []),
    ('{"answer": 42}', '{"answer": 42}', []),
    ("a <tool_call>not json</tool_call> b", "a <tool_call>not json</tool_call> b", []),
    ("x < y and x <tool but no call", "x < y and x <tool but no call", []),
    # Cut off inside a call (max_tokens): the call as far as it got.
    ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Par', "", [("get_weather", '{"city": "Par')]),
]


def drafts(calls):
    return [CallDraft(name, arguments) for name, arguments in calls]


@pytest.mark.parametrize("reply, content, calls", FREE_TEXT_CASES)
def test_free_text_calls(reply, content, calls):
    parsed = FreeTextToolCalls(NAMES).parse(reply, final=True)
    assert parsed.content == content
    assert parsed.calls == drafts(calls)
    for call in parsed.calls:
        if reply.rstrip().endswith(("}", "</tool_call>", "Done.")):
            json.loads(call.arguments)


def test_required_and_named_calls_read_the_constrained_json():
    reply = f' [{{"name": "get_weather", "arguments": {WEATHER}}}, {{"name": "get_time", "arguments": {{}}}}]'
    parsed = RequiredToolCalls(NAMES).parse(reply, final=True)
    assert parsed.content == "" and parsed.calls == drafts([("get_weather", WEATHER), ("get_time", "{}")])
    parsed = NamedToolCall("get_weather").parse(f"{WEATHER}\n", final=True)
    assert parsed.content == "" and parsed.calls == drafts([("get_weather", WEATHER)])
    assert NamedToolCall("get_time").parse("", final=True).calls == drafts([("get_time", "{}")])


def streamed(parser, pieces: list[str], max_calls=None) -> tuple[str, list[dict]]:
    """The content and calls a client assembles from the stream's deltas, checking OpenAI's rules
    for pieces on the way: a call's first piece has its id, type and name, later ones only arguments."""
    reader = ToolCallReader(parser, max_calls)
    content, calls = "", []
    text = ""
    for number, piece in enumerate(pieces):
        text += piece
        new_content, deltas = reader.step(text, final=number == len(pieces) - 1)
        content += new_content
        for delta in deltas:
            if delta.index == len(calls):
                assert delta.id.startswith("call_") and delta.type == "function" and delta.function.name
                calls.append({"id": delta.id, "name": delta.function.name, "arguments": delta.function.arguments})
            else:
                assert delta.id is None and delta.function.name is None and delta.function.arguments
                calls[delta.index]["arguments"] += delta.function.arguments
    return content, calls


def splits(text: str):
    """Every way to cut the text in two, and one character at a time."""
    for cut in range(len(text) + 1):
        yield [text[:cut], text[cut:]]
    yield list(text)


@pytest.mark.parametrize("reply", [case[0] for case in FREE_TEXT_CASES])
def test_a_stream_split_anywhere_adds_up_to_the_whole_message(reply):
    whole_reader = ToolCallReader(FreeTextToolCalls(NAMES), None)
    content, calls = whole_reader.message(reply)
    for pieces in splits(reply):
        streamed_content, streamed_calls = streamed(FreeTextToolCalls(NAMES), pieces)
        assert streamed_content == (content or "")
        assert [(c["name"], c["arguments"]) for c in streamed_calls] == [(c.function.name, c.function.arguments)
                                                                      for c in calls]


def test_streams_of_constrained_calls_add_up():
    reply = f'[{{"name": "get_weather", "arguments": {WEATHER}}}, {{"name": "get_time", "arguments": {{}}}}]'
    for pieces in splits(reply):
        content, calls = streamed(RequiredToolCalls(NAMES), pieces)
        assert content == "" and [(c["name"], c["arguments"]) for c in calls] == [("get_weather", WEATHER),
                                                                                 ("get_time", "{}")]
    for pieces in splits(WEATHER):
        content, calls = streamed(NamedToolCall("get_weather"), pieces)
        assert content == "" and [(c["name"], c["arguments"]) for c in calls] == [("get_weather", WEATHER)]


def test_arguments_stream_in_pieces_and_markup_never_reaches_content():
    reply = f'Sure.\n<tool_call>\n{{"name": "get_weather", "arguments": {WEATHER}}}\n</tool_call>'
    reader = ToolCallReader(FreeTextToolCalls(NAMES), None)
    text, argument_pieces, content = "", 0, ""
    for char in reply:
        text += char
        new_content, deltas = reader.step(text, final=False)
        content += new_content
        argument_pieces += len(deltas)
        assert "<" not in content
    assert content == "Sure." and argument_pieces > 10


def test_without_parallel_calls_only_the_first_is_kept():
    reply = '{"name": "get_time", "parameters": {}}; {"name": "get_weather", "parameters": {"city": "Oslo"}}'
    for pieces in splits(reply):
        _, calls = streamed(FreeTextToolCalls(NAMES), pieces, max_calls=1)
        assert [c["name"] for c in calls] == ["get_time"]
    content, calls = ToolCallReader(FreeTextToolCalls(NAMES), 1).message(reply)
    assert content is None and [c.function.name for c in calls] == ["get_time"]
