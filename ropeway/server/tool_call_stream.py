"""One choice's tool calls as OpenAI streams them, and as a whole response holds them.

Each step the parser reads the choice's text so far; what it has settled since the last step is
sent: new content as `delta.content`, a new call as its first piece (index, id, type, name and the
arguments written so far), more arguments as pieces of the same index. The last step reads the
text as final, so the pieces add up to exactly the response's message.
"""

import uuid
from dataclasses import dataclass, field

from .protocol import FunctionCall, FunctionCallDelta, ToolCall, ToolCallDelta
from .tool_call_parser import CallDraft, FreeTextToolCalls, NamedToolCall, RequiredToolCalls

Parser = FreeTextToolCalls | RequiredToolCalls | NamedToolCall


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


@dataclass
class ToolCallReader:
    parser: Parser
    max_calls: int | None  # None: any number; later calls are dropped
    sent_content: int = 0
    sent_arguments: list[int] = field(default_factory=list)  # per call: characters of arguments sent
    call_ids: list[str] = field(default_factory=list)

    def _calls(self, text: str, final: bool) -> tuple[str, list[CallDraft]]:
        parsed = self.parser.parse(text, final)
        return parsed.content, parsed.calls[:self.max_calls]

    def _id(self, index: int) -> str:
        while len(self.call_ids) <= index:
            self.call_ids.append(new_call_id())
        return self.call_ids[index]

    def message(self, text: str) -> tuple[str | None, list[ToolCall]]:
        """(content, calls) of the finished text; content None when there are calls and no text."""
        content, calls = self._calls(text, final=True)
        tool_calls = [ToolCall(id=self._id(index), function=FunctionCall(name=call.name, arguments=call.arguments))
                      for index, call in enumerate(calls)]
        return (content or None) if tool_calls else content, tool_calls

    def step(self, text: str, final: bool) -> tuple[str, list[ToolCallDelta]]:
        """(new content, new tool-call pieces) for the text so far."""
        content, calls = self._calls(text, final)
        new_content = content[self.sent_content:]
        self.sent_content = len(content)
        pieces = []
        for index, call in enumerate(calls):
            if index == len(self.sent_arguments):
                pieces.append(ToolCallDelta(index=index, id=self._id(index), type="function",
                                            function=FunctionCallDelta(name=call.name, arguments=call.arguments)))
                self.sent_arguments.append(len(call.arguments))
            elif len(call.arguments) > self.sent_arguments[index]:
                pieces.append(ToolCallDelta(index=index, function=FunctionCallDelta(
                    arguments=call.arguments[self.sent_arguments[index]:])))
                self.sent_arguments[index] = len(call.arguments)
        return new_content, pieces

    @property
    def made_calls(self) -> bool:
        return bool(self.sent_arguments)
