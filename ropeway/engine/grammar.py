"""A request's StructuredOutputs as a grammar of llguidance, the grammar engine structured outputs run on.

llguidance was picked over xgrammar (BENCHMARKS.md, issue 17): it builds its lexer lazily, so a
schema costs under a millisecond before its first mask instead of ~9 ms (up to 150 ms), it
honoured every constraint of the test suite's 52 schemas (xgrammar ignores maxLength next to a
format), and it fills a batch's masks on its own threads without the GIL. Its parser limits
bound every step's work, so no grammar a client sends can hold up the engine core's loop.
"""

import functools
import json

import llguidance

from ropeway.request_bounds import InvalidParameter
from ropeway.sampling_params import SamplingParams
from ropeway.structured_outputs import StructuredOutputs

# llguidance's own defaults (a mask step's lexer and parser work, ~15 ms at most), stated once:
# the matcher runs out of fuel, and the request fails, rather than hold up the batch.
PARSER_LIMITS = dict(step_lexer_fuel=200_000, step_max_items=50_000, initial_lexer_fuel=1_000_000,
                     max_grammar_size=500_000, verbose_errors=False)


def parser_limits() -> llguidance.LLParserLimits:
    return llguidance.LLParserLimits(**PARSER_LIMITS)


def _kind(constraint: StructuredOutputs) -> str:
    if constraint.json is not None or constraint.json_object:
        return "json"
    return next(kind for kind in ("regex", "choice", "grammar") if getattr(constraint, kind) is not None)


def _field(constraint: StructuredOutputs) -> str:
    """The request field to name in an error: response_format's schema, or structured_outputs.<kind>."""
    if constraint.param != "structured_outputs":
        return constraint.param
    return f"structured_outputs.{_kind(constraint)}"


@functools.lru_cache(maxsize=1024)
def grammar_text(constraint: StructuredOutputs) -> str:
    """llguidance's grammar for the constraint (cached: the same schema is converted once).
    Raises InvalidParameter naming the field when the text is not a schema, regex or grammar."""
    kind = _kind(constraint)
    if kind == "json":
        source = constraint.json if constraint.json is not None else '{"type": "object"}'
        try:
            schema = json.loads(source)
        except ValueError as error:
            raise InvalidParameter(_field(constraint), f"the JSON schema is not valid JSON: {error}") from None
        if not isinstance(schema, dict):
            raise InvalidParameter(_field(constraint), "the JSON schema must be an object")
        # Compact JSON: a model given free whitespace can pad its output until max_tokens.
        return _converted(constraint, llguidance.LLMatcher.grammar_from_json_schema, schema,
                          {"whitespace_flexible": False})
    if kind == "regex":
        return _converted(constraint, llguidance.LLMatcher.grammar_from_regex, constraint.regex)
    if kind == "choice":
        if not constraint.choice:
            raise InvalidParameter(_field(constraint), "choice needs at least one string")
        return _converted(constraint, llguidance.grammar_from, "choice", json.dumps(constraint.choice))
    return _converted(constraint, llguidance.grammar_from, "grammar", constraint.grammar)


def _converted(constraint: StructuredOutputs, convert, *args) -> str:
    try:
        return convert(*args)
    except (ValueError, TypeError) as error:
        raise InvalidParameter(_field(constraint), f"cannot compile the {_kind(constraint)}: {error}") from None


class GrammarTokenizer:
    """llguidance's view of the model's vocabulary (built on first use: ~0.3 s at 49k tokens,
    ~1.3 s at 128k), shared by the checks at the edge and the engine core's matchers."""

    def __init__(self, tokenizer_json: str, vocab_size: int, eos_token_ids: list[int]):
        self.tokenizer_json = tokenizer_json
        self.vocab_size = vocab_size  # the logits' width, which may pass the tokenizer's own
        self.eos_token_ids = list(eos_token_ids)

    @functools.cached_property
    def tokenizer(self) -> llguidance.LLTokenizer:
        return llguidance.LLTokenizer(self.tokenizer_json, n_vocab=self.vocab_size, eos_token=self.eos_token_ids)

    def check(self, params: SamplingParams) -> None:
        """Raises InvalidParameter naming the field for a constraint that cannot run: one that does
        not compile, or one next to a setting that would contradict it."""
        constraint = params.structured_outputs
        if constraint is None:
            return
        conflicts = [
            (not self.eos_token_ids, constraint.param, "structured outputs need a model with an EOS token"),
            (params.ignore_eos, "ignore_eos", "ignore_eos cannot be combined with structured outputs: once the "
                                              "output matches, only EOS may follow"),
            (params.min_tokens > 0, "min_tokens", "min_tokens cannot be combined with structured outputs: the "
                                                  "output may match in fewer tokens"),
            (params.max_tokens == 0, "max_tokens", "structured outputs need max_tokens of at least 1"),
        ]
        for conflict, param, message in conflicts:
            if conflict:
                raise InvalidParameter(param, message)
        grammar = grammar_text(constraint)
        error = llguidance.LLMatcher.validate_grammar(grammar, self.tokenizer, limits=parser_limits())
        if error:
            raise InvalidParameter(_field(constraint), f"cannot compile the {_kind(constraint)}: {error}")

    def matcher(self, constraint: StructuredOutputs) -> llguidance.LLMatcher:
        return llguidance.LLMatcher(self.tokenizer, grammar_text(constraint), limits=parser_limits())
