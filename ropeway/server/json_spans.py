"""Where the members of a JSON object lie in text that may still be arriving.

Tool calls stream as the model writes them: a call's name is known once its string closes, and its
arguments are passed on as the raw text the model wrote, a piece per step. So the parser needs
spans (where a value starts, where it ends once it has), not values; `json.loads` reads the
finished pieces. The scan follows strings, escapes and bracket nesting, and stops at the first
character that cannot be JSON, so text after a broken object is never taken for part of it.
"""

import json
from dataclasses import dataclass

WHITESPACE = " \t\r\n"
_SCALAR_CHARS = frozenset("0123456789+-.eEtruefalsn")
_CLOSING = {"{": "}", "[": "]"}


@dataclass(frozen=True)
class Member:
    key: str
    start: int        # the value's first character
    end: int | None   # one past its last character; None while it is unfinished


@dataclass(frozen=True)
class ObjectScan:
    members: list[Member]
    end: int | None = None      # one past the closing brace; None while the object is open
    stopped: int | None = None  # where the text stopped being JSON

    def member(self, *keys: str) -> Member | None:
        """The first member named by the first of `keys` the object has."""
        for key in keys:
            for member in self.members:
                if member.key == key:
                    return member
        return None


def skip(text: str, pos: int, chars: str = WHITESPACE) -> int:
    while pos < len(text) and text[pos] in chars:
        pos += 1
    return pos


def string_end(text: str, pos: int) -> int | None:
    """One past the closing quote of the string opening at text[pos]; None if it has not closed."""
    pos += 1
    while pos < len(text):
        char = text[pos]
        if char == "\\":
            pos += 2
            continue
        if char == '"':
            return pos + 1
        pos += 1
    return None


def scan_value(text: str, pos: int) -> tuple[int | None, int | None]:
    """(end, stopped) of the JSON value starting at text[pos]: end is None while it is unfinished
    (a number at the end of the text may still grow), stopped is where it stopped being JSON."""
    if text[pos] == '"':
        return string_end(text, pos), None
    if text[pos] not in _CLOSING:
        while pos < len(text) and text[pos] in _SCALAR_CHARS:
            pos += 1
        if pos == len(text):
            return None, None
        return pos, None
    expected_closers = []
    while pos < len(text):
        char = text[pos]
        if char in _CLOSING:
            expected_closers.append(_CLOSING[char])
        elif char in "}]":
            if char != expected_closers.pop():
                return None, pos
            if not expected_closers:
                return pos + 1, None
        elif char == '"':
            end = string_end(text, pos)
            if end is None:
                return None, None
            pos = end
            continue
        elif char not in WHITESPACE and char not in ",:" and char not in _SCALAR_CHARS:
            return None, pos
        pos += 1
    return None, None


def scan_object(text: str, pos: int) -> ObjectScan:
    """The members of the object opening at text[pos] ('{'), as far as the text goes."""
    members: list[Member] = []
    pos += 1
    expect_key = True
    while True:
        pos = skip(text, pos)
        if pos >= len(text):
            return ObjectScan(members)
        char = text[pos]
        if char == "}":
            return ObjectScan(members, end=pos + 1)
        if not expect_key:
            if char != ",":
                return ObjectScan(members, stopped=pos)
            expect_key = True
            pos += 1
            continue
        if char != '"':
            return ObjectScan(members, stopped=pos)
        key_end = string_end(text, pos)
        if key_end is None:
            return ObjectScan(members)
        try:
            key = json.loads(text[pos:key_end])
        except ValueError:  # a bad escape
            return ObjectScan(members, stopped=pos)
        pos = skip(text, key_end)
        if pos >= len(text):
            return ObjectScan(members)
        if text[pos] != ":":
            return ObjectScan(members, stopped=pos)
        pos = skip(text, pos + 1)
        if pos >= len(text):
            return ObjectScan(members)
        end, stopped = scan_value(text, pos)
        members.append(Member(key, pos, end))
        if stopped is not None or end is None:
            return ObjectScan(members, stopped=stopped)
        pos, expect_key = end, False
