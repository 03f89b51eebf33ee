"""Tool calls read out of a reply's text: the formats models write, and the two constrained ones.

Every parser reads the whole text so far (`final=False` while the reply is still arriving) and
says what is settled: the content outside calls, and each call's name and arguments (the raw
JSON text the model wrote, perhaps unfinished). A settled part never changes as the text grows,
so a stream can send the difference each step and end with exactly what a whole response holds:
text that might still turn out to be markup (a partial `<tool_call>`, a JSON object whose name is
not read yet, whitespace before a call) is held back until it is decided.

- `FreeTextToolCalls` (tool_choice "auto"): Hermes-style `<tool_call>{"name": .., "arguments": ..}
  </tool_call>` blocks anywhere in the reply, or a reply that starts with Llama-3.x JSON calls
  (`{"name": .., "parameters": ..}`, perhaps after `<|python_tag|>`, several separated by `;`).
  Only a declared tool's name makes a call; anything else stays content.
- `RequiredToolCalls` (tool_choice "required"): the constrained JSON array of {name, arguments}.
- `NamedToolCall` (a named function): the constrained arguments object of that function.
"""

import json
from dataclasses import dataclass, field

from .json_spans import ObjectScan, scan_object, scan_value, skip

HERMES_OPEN = "<tool_call>"
HERMES_CLOSE = "</tool_call>"
PYTHON_TAG = "<|python_tag|>"
NO_ARGUMENTS = "{}"


@dataclass(frozen=True)
class CallDraft:
    name: str
    arguments: str  # JSON text as written; unfinished while the call is


@dataclass(frozen=True)
class ParsedReply:
    content: str
    calls: list[CallDraft] = field(default_factory=list)


def _partial_marker_length(text: str, marker: str) -> int:
    """How many of text's last characters could be the start of `marker`."""
    for length in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-length:]):
            return length
    return 0


def _call_from(text: str, scan: ObjectScan, names: frozenset[str] | None, final: bool) -> tuple[CallDraft | None, bool]:
    """(the call the object holds, whether that is decided). `names`: the declared tools (None: any)."""
    name_member = scan.member("name")
    arguments_member = scan.member("arguments", "parameters")
    finished = final or scan.end is not None or scan.stopped is not None
    if arguments_member is not None and text[arguments_member.start] != "{":
        return None, True
    if name_member is None or name_member.end is None:
        return None, finished
    try:
        name = json.loads(text[name_member.start:name_member.end])
    except ValueError:
        return None, True
    if not isinstance(name, str) or (names is not None and name not in names):
        return None, True
    if arguments_member is None:
        return (CallDraft(name, NO_ARGUMENTS), True) if finished else (None, False)
    end = arguments_member.end
    if end is None:
        end = scan.stopped if scan.stopped is not None else len(text)
    return CallDraft(name, text[arguments_member.start:end]), True


class FreeTextToolCalls:
    def __init__(self, tool_names: frozenset[str]):
        self.names = tool_names

    def parse(self, text: str, final: bool) -> ParsedReply:
        start = skip(text, 0)
        head = text[start:]
        if head.startswith(("{", PYTHON_TAG)):
            return self._json_calls(text, start, final)
        if not final and (not head or PYTHON_TAG.startswith(head)):
            return ParsedReply("")
        return self._tagged_calls(text, final)

    def _json_calls(self, text: str, start: int, final: bool) -> ParsedReply:
        calls = []
        pos = start
        while True:
            pos = skip(text, pos, " \t\r\n;")
            if text.startswith(PYTHON_TAG, pos):
                pos += len(PYTHON_TAG)
                continue
            rest = text[pos:]
            if not final and PYTHON_TAG.startswith(rest):
                return ParsedReply("", calls)
            if not rest.startswith("{"):
                return ParsedReply(rest, calls)
            scan = scan_object(text, pos)
            call, decided = _call_from(text, scan, self.names, final)
            if not decided:
                return ParsedReply("", calls)
            if call is None:
                # Not a call: from here on the reply is text (all of it, if nothing before was a call).
                return ParsedReply(rest if calls else text, calls)
            calls.append(call)
            if scan.end is None:
                return ParsedReply("", calls)
            pos = scan.end

    def _tagged_calls(self, text: str, final: bool) -> ParsedReply:
        # Whitespace between text and a call is the call's layout, not content: it is dropped.
        content, calls = [], []
        pos, after_call = 0, False
        while True:
            segment_end = text.find(HERMES_OPEN, pos)
            segment = text[pos:] if segment_end == -1 else text[pos:segment_end]
            if after_call:
                segment = segment.lstrip()
            if segment_end == -1:
                if not final:
                    segment = segment[:len(segment) - _partial_marker_length(segment, HERMES_OPEN)].rstrip()
                content.append(segment)
                return ParsedReply("".join(content), calls)
            body = skip(text, segment_end + len(HERMES_OPEN))
            call, decided, after = None, True, len(text)
            if body < len(text) and text[body] == "{":
                scan = scan_object(text, body)
                call, decided = _call_from(text, scan, self.names, final)
                if scan.end is not None or scan.stopped is not None:
                    after = scan.end if scan.end is not None else scan.stopped
            elif body == len(text) and not final:
                decided = False
            closing = text.find(HERMES_CLOSE, after)
            block_end = len(text) if closing == -1 else closing + len(HERMES_CLOSE)
            if call is None and (not decided or (closing == -1 and not final)):
                content.append(segment.rstrip())  # the rest waits until the block is decided
                return ParsedReply("".join(content), calls)
            if call is None:
                content.append(segment + text[segment_end:block_end])  # not a call: the reader sees it as written
            else:
                content.append(segment.rstrip())
                calls.append(call)
            if closing == -1:
                return ParsedReply("".join(content), calls)
            pos, after_call = block_end, call is not None


class RequiredToolCalls:
    def __init__(self, tool_names: frozenset[str]):
        self.names = tool_names

    def parse(self, text: str, final: bool) -> ParsedReply:
        pos = skip(text, 0)
        if pos == len(text) or text[pos] != "[":
            return ParsedReply(text if final else "")
        calls = []
        pos += 1
        while True:
            pos = skip(text, pos)
            if pos == len(text) or text[pos] != "{":
                return ParsedReply("", calls)
            scan = scan_object(text, pos)
            call, _ = _call_from(text, scan, self.names, final)
            if call is not None:
                calls.append(call)
            if scan.end is None:
                return ParsedReply("", calls)
            pos = skip(text, scan.end)
            if pos == len(text) or text[pos] != ",":
                return ParsedReply("", calls)
            pos += 1


class NamedToolCall:
    def __init__(self, name: str):
        self.name = name

    def parse(self, text: str, final: bool) -> ParsedReply:
        start = skip(text, 0)
        if start == len(text):
            return ParsedReply("", [CallDraft(self.name, NO_ARGUMENTS if final else "")])
        end, stopped = scan_value(text, start)
        end = end if end is not None else stopped if stopped is not None else len(text)
        return ParsedReply("", [CallDraft(self.name, text[start:end])])
