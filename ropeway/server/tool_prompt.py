"""A chat's messages as its template reads them, tool definitions, calls and results included.

A template that knows tools (it reads the `tools` variable, as Llama-3.1's, Qwen's and Hermes'
do) gets them as transformers passes them: `tools` beside the messages, an assistant's
`tool_calls` with their arguments as objects, and `tool` messages with `tool_call_id` (and the
function's name). A template that does not (the default SmolLM2's) gets the fallback: the tools
listed in a system prompt block that asks for Hermes-style `<tool_call>` blocks, the assistant's
earlier calls written as such blocks, and tool results as a user turn of `<tool_response>` blocks.
"""

import json

from .errors import APIError
from .protocol import ChatMessage

# Templates written for OpenAI's roles know "system"; "developer" is OpenAI's newer name for it.
_TEMPLATE_ROLE = {"developer": "system"}

FALLBACK_TOOLS_PROMPT = """\
You can call these functions (tools), each described by a JSON object:
<tools>
{tools}
</tools>
Results of calls come back inside <tool_response></tool_response> tags. To call a function, reply with its name \
and arguments as a JSON object inside <tool_call></tool_call> tags, one block per call:
<tool_call>
{{"name": "<function name>", "arguments": {{"<argument name>": <value>}}}}
</tool_call>"""


def _checked_arguments(call, where: str) -> dict:
    try:
        arguments = json.loads(call.function.arguments)
    except ValueError:
        arguments = None
    if not isinstance(arguments, dict):
        raise APIError.bad_request("a tool call's arguments must be a JSON object as text", f"{where}.arguments")
    return arguments


def _checked(messages: list[ChatMessage]) -> list[dict]:
    """Template dicts for the messages; a 400 naming the field for tool calls and results that do
    not fit together."""
    entries, open_calls = [], {}
    for index, message in enumerate(messages):
        where = f"messages.{index}"
        entry = message.template_dict()
        entry["role"] = _TEMPLATE_ROLE.get(entry["role"], entry["role"])
        if message.tool_calls is not None and message.role != "assistant":
            raise APIError.bad_request("only assistant messages have tool_calls", f"{where}.tool_calls")
        if message.tool_call_id is not None and message.role != "tool":
            raise APIError.bad_request("only tool messages have a tool_call_id", f"{where}.tool_call_id")
        if message.tool_calls:
            open_calls = {}
            entry["tool_calls"] = []
            for number, call in enumerate(message.tool_calls):
                arguments = _checked_arguments(call, f"{where}.tool_calls.{number}.function")
                open_calls[call.id] = call.function.name
                entry["tool_calls"].append({"id": call.id, "type": "function",
                                            "function": {"name": call.function.name, "arguments": arguments}})
        elif message.role == "tool":
            if message.tool_call_id is None:
                raise APIError.bad_request("a tool message needs the tool_call_id of the call it answers",
                                           f"{where}.tool_call_id")
            if message.tool_call_id not in open_calls:
                raise APIError.bad_request(f"tool_call_id {message.tool_call_id!r} answers no tool call of the "
                                           "assistant message before it", f"{where}.tool_call_id")
            entry["tool_call_id"] = message.tool_call_id
            entry["name"] = open_calls[message.tool_call_id]
        else:
            open_calls = {}
        entries.append(entry)
    return entries


def _with_fallback_tools(entries: list[dict], tools: list[dict] | None) -> list[dict]:
    """The conversation in plain roles and text, for a template that does not know tools."""
    plain = []
    for entry in entries:
        if entry.get("tool_calls"):
            blocks = [f"<tool_call>\n{json.dumps(call['function'])}\n</tool_call>" for call in entry["tool_calls"]]
            plain.append({"role": "assistant", "content": "\n".join(filter(None, [entry["content"], *blocks]))})
        elif entry["role"] == "tool":
            block = f"<tool_response>\n{entry['content']}\n</tool_response>"
            if plain and plain[-1].get("tool_results"):  # the results of one turn's calls: one user turn
                plain[-1]["content"] += "\n" + block
            else:
                plain.append({"role": "user", "content": block, "tool_results": True})
        else:
            plain.append(entry)
    plain = [{key: value for key, value in entry.items() if key != "tool_results"} for entry in plain]
    if tools:
        listing = FALLBACK_TOOLS_PROMPT.format(tools="\n".join(json.dumps(tool) for tool in tools))
        if plain[0]["role"] == "system":
            plain[0] = {**plain[0], "content": f"{plain[0]['content']}\n\n{listing}"}
        else:
            plain.insert(0, {"role": "system", "content": listing})
    return plain


def template_input(messages: list[ChatMessage], tools: list[dict] | None,
                   template_knows_tools: bool) -> tuple[list[dict], list[dict] | None]:
    """(messages, tools) to render; tools is None when the fallback wrote them into the messages."""
    entries = _checked(messages)
    if template_knows_tools:
        return entries, tools
    return _with_fallback_tools(entries, tools), None
