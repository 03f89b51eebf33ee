"""What a chat request asks of tools (`tools`, `tool_choice`, `parallel_tool_calls`), checked once.

tool_choice, as OpenAI defines it: "none" (tools are shown to the model, no call is returned),
"auto" (the model may call: calls are parsed from its free text), "required" (at least one call)
and {"type": "function", "function": {"name": ...}} (exactly that function). The last two are
constrained: the reply must match a JSON schema built from the tools' parameter schemas, so the
calls always parse and their arguments always match -- for "required" an array of
{"name", "arguments"} objects with one alternative per tool (one item at most without
parallel_tool_calls), for a named function that function's arguments object alone.
"""

import json
from dataclasses import dataclass

from jsonschema import Draft202012Validator, SchemaError

from ropeway.structured_outputs import StructuredOutputs

from .errors import APIError
from .protocol import ChatCompletionRequest, NamedToolChoice
from .tool_call_parser import FreeTextToolCalls, NamedToolCall, RequiredToolCalls

NO_PARAMETERS = {"type": "object", "properties": {}, "additionalProperties": False}


@dataclass(frozen=True)
class ToolUse:
    tools: list[dict]      # {"type": "function", "function": {...}} for the chat template
    choice: str            # "none", "auto", "required" or "function"
    function: str | None   # the named function (choice "function")
    parallel: bool

    @property
    def names(self) -> frozenset[str]:
        return frozenset(tool["function"]["name"] for tool in self.tools)

    @property
    def max_calls(self) -> int | None:
        """None: any number. Without parallel_tool_calls a reply's later calls are dropped."""
        return None if self.parallel else 1

    def parser(self) -> FreeTextToolCalls | RequiredToolCalls | NamedToolCall | None:
        if self.choice == "auto":
            return FreeTextToolCalls(self.names)
        if self.choice == "required":
            return RequiredToolCalls(self.names)
        if self.choice == "function":
            return NamedToolCall(self.function)
        return None

    def constraint(self) -> StructuredOutputs | None:
        if self.choice == "function":
            return StructuredOutputs(json=json.dumps(self._parameters(self.function)), param="tool_choice")
        if self.choice != "required":
            return None
        alternatives = [{"type": "object",
                         "properties": {"name": {"const": name}, "arguments": self._parameters(name)},
                         "required": ["name", "arguments"], "additionalProperties": False}
                        for name in sorted(self.names)]
        calls = {"type": "array", "items": {"anyOf": alternatives}, "minItems": 1}
        if not self.parallel:
            calls["maxItems"] = 1
        return StructuredOutputs(json=json.dumps(calls), param="tool_choice")

    def _parameters(self, name: str) -> dict:
        for tool in self.tools:
            if tool["function"]["name"] == name:
                return _closed(tool["function"].get("parameters") or NO_PARAMETERS)
        raise KeyError(name)


def _closed(schema):
    """The schema with `additionalProperties: false` wherever an object schema lists properties and
    leaves it unsaid (as OpenAI's strict mode requires): every call still validates against the
    tool's own schema, and the model cannot pad its arguments with invented keys until max_tokens."""
    if isinstance(schema, list):
        return [_closed(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    closed = {key: _closed(value) for key, value in schema.items()}
    if "properties" in schema and "additionalProperties" not in schema:
        closed["additionalProperties"] = False
    return closed


def _checked_tools(body: ChatCompletionRequest) -> list[dict]:
    tools, seen = [], set()
    for index, tool in enumerate(body.tools):
        function = tool.function
        where = f"tools.{index}.function"
        if function.name in seen:
            raise APIError.bad_request(f"two tools are named {function.name!r}", f"{where}.name")
        seen.add(function.name)
        if function.parameters is not None:
            _check_parameters(function.parameters, f"{where}.parameters")
        tools.append({"type": "function", "function": function.model_dump(exclude_none=True)})
    return tools


def _check_parameters(schema: dict, param: str) -> None:
    if schema.get("type") != "object":
        raise APIError.bad_request(f"parameters must be a JSON schema of type \"object\"; got type "
                                   f"{json.dumps(schema.get('type'))}", param)
    try:
        Draft202012Validator.check_schema(schema)
    except SchemaError as error:
        raise APIError.bad_request(f"parameters is not a valid JSON schema: {error.message}", param) from error


def tool_use(body: ChatCompletionRequest) -> ToolUse | None:
    """The request's checked tool use; None when it has no tools. Raises a 400 naming the field."""
    choice = body.tool_choice
    if not body.tools:
        if body.tools is not None:
            raise APIError.bad_request("tools must list at least one tool (or be left out)", "tools")
        if choice not in (None, "none"):  # "none" asks for nothing: some clients send it by default
            raise APIError.bad_request("tool_choice needs tools", "tool_choice")
        return None
    tools = _checked_tools(body)
    if isinstance(choice, NamedToolChoice):
        name = choice.function.name
        if name not in {tool["function"]["name"] for tool in tools}:
            raise APIError.bad_request(f"tool_choice names the function {name!r}, which is not in tools",
                                       "tool_choice.function.name")
        return ToolUse(tools, "function", name, body.parallel_tool_calls)
    return ToolUse(tools, choice or "auto", None, body.parallel_tool_calls)
