"""The OpenAI-compatible wire format: request and response schemas (pydantic v2).

Requests accept OpenAI's fields plus the sampling extras vLLM users rely on (top_k, min_p,
repetition_penalty, ignore_eos, stop_token_ids, min_tokens, ...). An explicit null means
"unset", as OpenAI's spec allows for its nullable fields. OpenAI fields this server does not
implement are refused by name (unsupported_fields.py); fields nobody defined are ignored, as
OpenAI clients send fields a server may not know. Ranges are checked by SamplingParams, so
the offline engine and the server refuse exactly the same values.
"""

import json
import time
import uuid
from typing import ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_serializer, model_validator
from pydantic_core import PydanticCustomError

from ropeway.context_params import ContextParams
from ropeway.request_bounds import COMPLETION_MAX_TOKENS_BOUND, REQUEST_ONLY_BOUNDS, SAMPLING_BOUNDS, Bound
from ropeway.sampling_params import InvalidParameter, SamplingParams
from ropeway.structured_outputs import StructuredOutputs

LOGIT_BIAS_LIMIT = 100.0  # OpenAI's range for a bias: -100 (never) to 100 (always)


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now_seconds() -> int:
    return int(time.time())


def holds_lone_surrogate(value) -> bool:
    """JSON's \\ud800 escapes can make strings that are not Unicode: no tokenizer or encoder takes them."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")  # in C: fast even for a 10 MB prompt
        except UnicodeEncodeError:
            return True
        return False
    if isinstance(value, list):
        return any(holds_lone_surrogate(item) for item in value)
    if isinstance(value, dict):
        return any(holds_lone_surrogate(key) or holds_lone_surrogate(item) for key, item in value.items())
    return False


REQUEST_BOUNDS: dict[str, Bound] = {**SAMPLING_BOUNDS, **REQUEST_ONLY_BOUNDS}


def add_sampling_bounds(schema: dict, model: type) -> None:
    """Show the bounds table's ranges in the JSON schema (and so in /openapi.json)."""
    for name, field_schema in schema.get("properties", {}).items():
        bound = model.field_bound(name)
        if bound is None:
            continue
        for branch in field_schema.get("anyOf", [field_schema]):
            if branch.get("type") in ("integer", "number"):
                branch.update(bound.json_schema())


class RequestBody(BaseModel):
    # strict: JSON's types as sent ("5" is no integer, true no token id, 0 no boolean). Extra fields
    # are kept (model_extra) so the routes can refuse the OpenAI ones they lack.
    model_config = ConfigDict(extra="allow", strict=True)

    @model_validator(mode="before")
    @classmethod
    def _null_means_unset(cls, data):
        if isinstance(data, dict):
            return {key: value for key, value in data.items() if value is not None}
        return data

    @field_validator("*")
    @classmethod
    def _valid_unicode(cls, value):
        if holds_lone_surrogate(value):
            raise PydanticCustomError("invalid_unicode", "holds a lone UTF-16 surrogate, which is not valid Unicode")
        return value


class ResponseBody(BaseModel):
    model_config = ConfigDict(extra="forbid")


# ----- shared -----


class StreamOptions(RequestBody):
    include_usage: bool = False


class JsonSchemaFormat(RequestBody):
    """OpenAI's response_format.json_schema. The schema is enforced whatever `strict` says."""
    model_config = ConfigDict(extra="forbid")
    name: str
    schema_: dict = Field(alias="schema")
    description: str | None = None
    strict: bool | None = None


class ResponseFormat(RequestBody):
    """OpenAI's response_format: plain text, any JSON object, or JSON that matches a schema."""
    model_config = ConfigDict(extra="forbid")
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StructuredOutputsRequest(RequestBody):
    """vLLM's structured_outputs: exactly one of a JSON schema (object or JSON text), any JSON
    object, a regex, a choice of strings, or a grammar (GBNF/EBNF or Lark)."""
    model_config = ConfigDict(extra="forbid")
    json_: dict | str | None = Field(default=None, alias="json")
    json_object: bool | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None


class SamplingFields(RequestBody):
    """Fields common to completions and chat completions."""
    model_config = ConfigDict(json_schema_extra=add_sampling_bounds)
    model: str | None = None  # None: the served model
    n: int = 1
    temperature: float | None = None
    top_p: float | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # vLLM's extras
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    min_tokens: int = 0
    truncate_prompt_tokens: int | None = None  # keep only the prompt's last k tokens (-1: the context limit)
    return_tokens_as_token_ids: bool = False  # logprobs name tokens "token_id:<id>"
    prompt_logprobs: int | None = None  # the prompt tokens' logprobs, each with the k likeliest tokens
    logit_bias: dict[str, float] | None = None
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputsRequest | None = None
    # ropeway's extensions: this request's RoPE scaling, e.g. {"rope_type": "dynamic", "factor": 4},
    # and its cache policy, e.g. {"type": "sink_window", "sinks": 4, "window": 4096}
    rope_scaling: dict | None = None
    context_policy: dict | None = None

    # A route's own bounds where they differ from the table's.
    bound_overrides: ClassVar[dict[str, Bound]] = {}

    @classmethod
    def field_bound(cls, name: str) -> Bound | None:
        return cls.bound_overrides.get(name) or REQUEST_BOUNDS.get(name)

    @field_validator(*REQUEST_BOUNDS, check_fields=False)
    @classmethod
    def _within_bounds(cls, value, info):
        bound = cls.field_bound(info.field_name)
        # (Chat's logprobs is a boolean: the bound is completions' number of logprobs.)
        if value is not None and not isinstance(value, bool) and not bound.contains(value):
            raise PydanticCustomError("out_of_range", f"must be {bound.describe()}")
        return value

    def context_params(self) -> ContextParams | None:
        if self.rope_scaling is None and self.context_policy is None:
            return None
        return ContextParams(rope_scaling=self.rope_scaling, context_policy=self.context_policy)

    def sampling_params(self, max_tokens: int | None, logprobs: int | None, vocab_size: int) -> SamplingParams:
        """Raises InvalidParameter naming the offending field."""
        optional = {
            "temperature": self.temperature, "top_p": self.top_p, "top_k": self.top_k,
            "min_p": self.min_p, "repetition_penalty": self.repetition_penalty,
        }
        if self.stream_options is not None and not self.stream:
            raise InvalidParameter("stream_options", "stream_options is only allowed with stream: true")
        out_of_vocabulary = [t for t in self.stop_token_ids or [] if not 0 <= t < vocab_size]
        if out_of_vocabulary:
            raise InvalidParameter("stop_token_ids", f"stop_token_ids must be token ids in [0, {vocab_size}); "
                                                     f"got {out_of_vocabulary[0]}")
        params = SamplingParams(
            n=self.n,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            seed=self.seed,
            stop=self.stop or [],
            stop_token_ids=self.stop_token_ids or [],
            max_tokens=max_tokens,
            ignore_eos=self.ignore_eos,
            logprobs=logprobs,
            skip_special_tokens=self.skip_special_tokens,
            include_stop_str_in_output=self.include_stop_str_in_output,
            prompt_logprobs=self.prompt_logprobs is not None,
            prompt_top_logprobs=self.prompt_logprobs or 0,
            min_tokens=self.min_tokens,
            logit_bias=self._token_logit_bias(vocab_size),
            structured_outputs=self._structured_outputs(),
            **{name: value for name, value in optional.items() if value is not None},
        )
        if not 0 <= self.min_tokens <= (params.max_tokens or self.min_tokens):
            raise InvalidParameter("min_tokens", "min_tokens must be between 0 and max_tokens")
        return params

    def _structured_outputs(self) -> StructuredOutputs | None:
        """OpenAI's response_format or vLLM's structured_outputs, as the engine's constraint."""
        given, form = self.structured_outputs, self.response_format
        if given is not None and form is not None and form.type != "text":
            raise InvalidParameter("structured_outputs", "give response_format or structured_outputs, not both")
        if given is not None:
            json_schema = json.dumps(given.json_) if isinstance(given.json_, dict) else given.json_
            return StructuredOutputs(json=json_schema, json_object=bool(given.json_object), regex=given.regex,
                                     choice=None if given.choice is None else tuple(given.choice),
                                     grammar=given.grammar)
        if form is None or form.type == "text":
            return None
        if form.type == "json_object":
            return StructuredOutputs(json_object=True, param="response_format")
        if form.json_schema is None:
            raise InvalidParameter("response_format.json_schema", "response_format of type json_schema needs "
                                                                  "its json_schema")
        return StructuredOutputs(json=json.dumps(form.json_schema.schema_), param="response_format.json_schema.schema")

    def _token_logit_bias(self, vocab_size: int) -> dict[int, float] | None:
        """OpenAI's {"token id as a string": bias} as {token id: bias}."""
        if not self.logit_bias:
            return None
        biases = {}
        for key, bias in self.logit_bias.items():
            try:
                token_id = int(key)
            except ValueError:
                raise InvalidParameter("logit_bias", f"logit_bias keys must be token ids; got {key!r}") from None
            if not 0 <= token_id < vocab_size:
                raise InvalidParameter("logit_bias", f"logit_bias token ids must be in [0, {vocab_size}); "
                                                     f"got {token_id}")
            if not -LOGIT_BIAS_LIMIT <= bias <= LOGIT_BIAS_LIMIT:
                raise InvalidParameter("logit_bias", f"logit_bias values must be between -100 and 100; got {bias}")
            biases[token_id] = bias
        return biases

    def truncated(self, token_ids: list[int], max_model_len: int) -> list[int]:
        """The prompt as vLLM's truncate_prompt_tokens cuts it: only its last k tokens."""
        keep = self.truncate_prompt_tokens
        if keep is None:
            return token_ids
        if keep == -1:
            keep = max_model_len
        if keep < 1:
            raise InvalidParameter("truncate_prompt_tokens", "truncate_prompt_tokens must be -1 or at least 1")
        return token_ids[-keep:]

    @property
    def include_usage_in_stream(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class PromptTokensDetails(ResponseBody):
    cached_tokens: int  # prompt tokens not computed again: prefix-cache hits and a continued chat session


class RopewayUsage(ResponseBody):
    """ropeway's extension of usage: what a bounded cache (sink_window, landmark) did."""
    evicted_tokens: int  # tokens of the prompt and completion no longer in the cache


class Usage(ResponseBody):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None
    ropeway: RopewayUsage | None = None


class PromptTokenLogprob(ResponseBody):
    """vLLM's entry of prompt_logprobs: a token at one prompt position."""
    logprob: float
    rank: int | None  # 1 for the likeliest token; None for a prompt token outside the top k
    decoded_token: str


# vLLM's prompt_logprobs: per prompt token (None for the first), token id -> its entry; the
# prompt's own token is always there, with the k likeliest.
PromptLogprobs = list[dict[str, PromptTokenLogprob] | None]


FinishReason = Literal["stop", "length", "abort"]
ChatFinishReason = Literal["stop", "length", "abort", "tool_calls"]  # tool_calls: the reply ended in calls


# ----- /v1/completions -----


class CompletionRequest(SamplingFields):
    bound_overrides: ClassVar[dict[str, Bound]] = {"max_tokens": COMPLETION_MAX_TOKENS_BOUND}
    # A string, a list of strings, a list of token ids, or a list of lists of token ids.
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = 16  # 0: score the prompt only (with echo or prompt_logprobs)
    logprobs: int | None = None
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None


class CompletionLogprobs(ResponseBody):
    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class CompletionChoice(ResponseBody):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: FinishReason | None = None
    stop_reason: str | int | None = None
    prompt_logprobs: PromptLogprobs | None = None


class CompletionResponse(ResponseBody):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None

    @model_serializer(mode="wrap")
    def _usage_only_when_given(self, serialize):
        # OpenAI's spec has no null usage for completions: stream chunks before the usage leave it out.
        body = serialize(self)
        if body.get("usage", ...) is None:
            del body["usage"]
        return body


# ----- /v1/chat/completions -----


class TextPart(RequestBody):
    type: Literal["text"]
    text: str


class MessageFunctionCall(RequestBody):
    name: str
    arguments: str  # JSON text, as the assistant's reply gave it


class MessageToolCall(RequestBody):
    id: str
    type: Literal["function"]
    function: MessageFunctionCall


class ChatMessage(RequestBody):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[MessageToolCall] | None = None  # an assistant's calls (its content may then be null)
    tool_call_id: str | None = None  # a tool message: the call it answers

    @property
    def text(self) -> str:
        """The content as one string."""
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""

    def template_dict(self) -> dict:
        """The message as chat templates expect it: content as one string."""
        message = {"role": self.role, "content": self.text}
        if self.name is not None:
            message["name"] = self.name
        return message


class FunctionDefinition(RequestBody):
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")  # OpenAI's rule for function names
    description: str | None = None
    parameters: dict | None = None  # a JSON schema of type object; none: the function takes no arguments
    strict: bool | None = None


class ToolDefinition(RequestBody):
    type: Literal["function"]
    function: FunctionDefinition


class ToolChoiceFunction(RequestBody):
    name: str


class NamedToolChoice(RequestBody):
    type: Literal["function"]
    function: ToolChoiceFunction


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False  # the reply continues the last (assistant) message
    tools: list[ToolDefinition] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None  # None: "auto" with tools
    parallel_tool_calls: bool = True


class TopLogprob(ResponseBody):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprobContent(ResponseBody):
    token: str
    logprob: float
    bytes: list[int] | None
    top_logprobs: list[TopLogprob]


class ChatLogprobs(ResponseBody):
    content: list[TokenLogprobContent] | None = None
    refusal: None = None  # OpenAI's field for a refusal's tokens: this server never refuses


def _without_none(serialize, model, keys: tuple[str, ...]) -> dict:
    # OpenAI leaves these fields out rather than sending null.
    return {key: value for key, value in serialize(model).items() if value is not None or key not in keys}


class FunctionCall(ResponseBody):
    name: str
    arguments: str  # JSON text


class ToolCall(ResponseBody):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class FunctionCallDelta(ResponseBody):
    name: str | None = None
    arguments: str | None = None

    @model_serializer(mode="wrap")
    def _only_what_is_sent(self, serialize):
        return _without_none(serialize, self, ("name", "arguments"))


class ToolCallDelta(ResponseBody):
    """A piece of a streamed tool call: the first names it (id, type, name); the rest add arguments."""
    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: FunctionCallDelta

    @model_serializer(mode="wrap")
    def _only_what_is_sent(self, serialize):
        return _without_none(serialize, self, ("id", "type"))


class AssistantMessage(ResponseBody):
    role: Literal["assistant"] = "assistant"
    content: str | None  # None: the reply is tool calls only
    refusal: None = None
    tool_calls: list[ToolCall] | None = None

    @model_serializer(mode="wrap")
    def _tool_calls_only_when_made(self, serialize):
        return _without_none(serialize, self, ("tool_calls",))


class ChatChoice(ResponseBody):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: ChatFinishReason | None = None
    stop_reason: str | int | None = None


class ChatCompletionResponse(ResponseBody):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    prompt_logprobs: PromptLogprobs | None = None


class ChoiceDelta(ResponseBody):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[ToolCallDelta] | None = None

    @model_serializer(mode="wrap")
    def _only_what_changed(self, serialize):
        # OpenAI's deltas leave out what did not change: {"content": "Hi"}, or {} at the end.
        return {key: value for key, value in serialize(self).items() if value is not None}


class ChatChunkChoice(ResponseBody):
    index: int
    delta: ChoiceDelta
    logprobs: ChatLogprobs | None = None
    finish_reason: ChatFinishReason | None = None
    stop_reason: str | int | None = None


class ChatCompletionChunk(ResponseBody):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


# ----- /v1/models -----


class ModelCard(ResponseBody):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "ropeway"
    root: str
    max_model_len: int
    # ropeway's extensions: the context the model was trained for, and the server's default
    # context_policy (what a request without its own gets), every field filled in.
    trained_context_len: int
    context_policy: dict


class ModelList(ResponseBody):
    object: Literal["list"] = "list"
    data: list[ModelCard]


# ----- /tokenize, /detokenize -----


class TokenizeRequest(RequestBody):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True


class TokenizeResponse(ResponseBody):
    tokens: list[int]
    count: int
    max_model_len: int


class DetokenizeRequest(RequestBody):
    model: str | None = None
    tokens: list[int]


class DetokenizeResponse(ResponseBody):
    prompt: str


# ----- errors -----


class ErrorDetail(ResponseBody):
    message: str
    type: str
    param: str | None = None
    code: str | int | None = None


class ErrorResponse(ResponseBody):
    error: ErrorDetail
