"""What a request's output must match: a JSON schema, any JSON object, a regex, one of some strings, or a grammar.

Plain data, made at the edge (OpenAI's `response_format`, vLLM's `structured_outputs`, tool calls) and carried
inside SamplingParams to the engine core, where a grammar engine compiles it into per-step token masks.
"""

from dataclasses import dataclass

from ropeway.request_bounds import InvalidParameter


@dataclass(frozen=True)
class StructuredOutputs:
    json: str | None = None          # a JSON schema, as JSON text (hashable: the compile cache's key)
    json_object: bool = False        # any JSON object (OpenAI's {"type": "json_object"})
    regex: str | None = None
    choice: tuple[str, ...] | None = None
    grammar: str | None = None       # EBNF / GBNF text
    param: str = "structured_outputs"  # the request field it came from, named in errors

    def __post_init__(self):
        kinds = [self.json is not None, self.json_object, self.regex is not None, self.choice is not None,
                 self.grammar is not None]
        if sum(kinds) != 1:
            raise InvalidParameter(self.param, "give exactly one of json, json_object, regex, choice, grammar")
