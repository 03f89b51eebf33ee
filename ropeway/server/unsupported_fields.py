"""OpenAI request fields this server knows but does not act on, and what it does with each.

A client that sets a refused field (to anything but null) gets a 400 naming it rather than a
reply that quietly lacks what it asked for. NO_EFFECT fields, at the values listed, ask for
nothing this server would do differently (identifiers, cache and routing hints, defaults
that some clients send explicitly): they are accepted, other values get a 400. The lists
follow OpenAI's request schemas (tests/data/openai-openapi); every other field of those
schemas is a field of protocol.py's requests.
"""

import json

from .errors import APIError

# OpenAI's deprecated functions API (tools and tool_choice do the same), audio, predicted outputs, search,
# reasoning controls.
REFUSED_CHAT_FIELDS = (
    "functions", "function_call", "audio", "prediction", "web_search_options", "reasoning_effort", "verbosity",
    "moderation",
)

# A message's function call (the deprecated functions API) and audio.
REFUSED_MESSAGE_FIELDS = ("function_call", "audio")

# What to send instead, where the server has it.
INSTEAD = {"functions": "tools", "function_call": "tool_choice (and a message's tool_calls)"}

NO_EFFECT: dict[str, tuple | None] = {  # None: any value
    "metadata": None,                 # tags for stored completions; nothing is stored
    "store": (False,),                # storing completions is not offered: only false
    "service_tier": ("auto", "default"),
    # The defaults, which some clients send explicitly: text, no tool call.
    "modalities": (["text"],),
    "prompt_cache_key": None,         # a routing hint; the prefix cache finds shared prefixes by content
    "prompt_cache_retention": None,
    "prompt_cache_options": None,
    "safety_identifier": None,
}


def refuse_unsupported(extra_fields: dict | None, refused: tuple[str, ...] = (), where: str = "") -> None:
    """400 for the first field of `extra_fields` (a request's model_extra) that asks for
    something this server does not do; `where` prefixes the field's name ("messages.2.")."""
    for name, value in (extra_fields or {}).items():
        if name in refused:
            instead = f"; use {INSTEAD[name]}" if name in INSTEAD else ""
            raise APIError.bad_request(f"{where}{name} is not supported by this server{instead}", where + name)
        if NO_EFFECT.get(name) is not None and value not in NO_EFFECT[name]:
            allowed = " or ".join(json.dumps(v) for v in NO_EFFECT[name])
            raise APIError.bad_request(f"{name} may only be {allowed} on this server", name)
