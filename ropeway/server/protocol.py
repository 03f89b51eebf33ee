"""The OpenAI-compatible wire format: request and response schemas (pydantic v2).

Requests accept OpenAI's fields plus the sampling extras vLLM users rely on (top_k, min_p,
repetition_penalty, ignore_eos, stop_token_ids). Unknown fields are ignored, as OpenAI
clients send fields a server may not know. Ranges are checked by SamplingParams, so the
offline engine and the server refuse exactly the same values.
"""

import time
import uuid
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_serializer
from pydantic_core import PydanticCustomError

from ropeway.context_params import ContextParams
from ropeway.request_bounds import SAMPLING_BOUNDS
from ropeway.sampling_params import SamplingParams


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


def add_sampling_bounds(schema: dict) -> None:
    """Show the bounds table's ranges in the JSON schema (and so in /openapi.json)."""
    for name, field_schema in schema.get("properties", {}).items():
        bound = SAMPLING_BOUNDS.get(name)
        if bound is None:
            continue
        for branch in field_schema.get("anyOf", [field_schema]):
            if branch.get("type") in ("integer", "number"):
                branch.update(bound.json_schema())


class RequestBody(BaseModel):
    # strict: JSON's types as sent ("5" is no integer, true no token id, 0 no boolean).
    model_config = ConfigDict(extra="ignore", strict=True)

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
    # ropeway's extensions: this request's RoPE scaling, e.g. {"rope_type": "dynamic", "factor": 4},
    # and its cache policy, e.g. {"type": "sink_window", "sinks": 4, "window": 4096}
    rope_scaling: dict | None = None
    context_policy: dict | None = None

    @field_validator(*SAMPLING_BOUNDS, check_fields=False)
    @classmethod
    def _within_bounds(cls, value, info):
        bound = SAMPLING_BOUNDS[info.field_name]
        # (Chat's logprobs is a boolean: the bound is completions' number of logprobs.)
        if value is not None and not isinstance(value, bool) and not bound.contains(value):
            raise PydanticCustomError("out_of_range", f"must be {bound.describe()}")
        return value

    def context_params(self) -> ContextParams | None:
        if self.rope_scaling is None and self.context_policy is None:
            return None
        return ContextParams(rope_scaling=self.rope_scaling, context_policy=self.context_policy)

    def sampling_params(self, max_tokens: int | None, logprobs: int | None) -> SamplingParams:
        """Raises InvalidParameter naming the offending field."""
        optional = {
            "temperature": self.temperature, "top_p": self.top_p, "top_k": self.top_k,
            "min_p": self.min_p, "repetition_penalty": self.repetition_penalty,
        }
        return SamplingParams(
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
            **{name: value for name, value in optional.items() if value is not None},
        )

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


FinishReason = Literal["stop", "length", "abort"]


# ----- /v1/completions -----


class CompletionRequest(SamplingFields):
    # A string, a list of strings, a list of token ids, or a list of lists of token ids.
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = 16
    logprobs: int | None = None
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None
    logit_bias: dict[str, float] | None = None


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


class CompletionResponse(ResponseBody):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    system_fingerprint: str | None = None
    choices: list[CompletionChoice]
    usage: Usage | None = None


# ----- /v1/chat/completions -----


class TextPart(RequestBody):
    type: Literal["text"]
    text: str


class ChatMessage(RequestBody):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def template_dict(self) -> dict:
        """The message as chat templates expect it: content as one string."""
        content = self.content
        if isinstance(content, list):
            content = "".join(part.text for part in content)
        message = {"role": self.role, "content": content or ""}
        if self.name is not None:
            message["name"] = self.name
        return message


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    add_generation_prompt: bool = True
    logit_bias: dict[str, float] | None = None


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


class AssistantMessage(ResponseBody):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(ResponseBody):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: FinishReason | None = None
    stop_reason: str | int | None = None


class ChatCompletionResponse(ResponseBody):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    system_fingerprint: str | None = None
    choices: list[ChatChoice]
    usage: Usage


class ChoiceDelta(ResponseBody):
    role: Literal["assistant"] | None = None
    content: str | None = None

    @model_serializer(mode="wrap")
    def _only_what_changed(self, serialize):
        # OpenAI's deltas leave out what did not change: {"content": "Hi"}, or {} at the end.
        return {key: value for key, value in serialize(self).items() if value is not None}


class ChatChunkChoice(ResponseBody):
    index: int
    delta: ChoiceDelta
    logprobs: ChatLogprobs | None = None
    finish_reason: FinishReason | None = None
    stop_reason: str | int | None = None


class ChatCompletionChunk(ResponseBody):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    system_fingerprint: str | None = None
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
