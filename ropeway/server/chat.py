"""POST /v1/chat/completions: messages through the model's chat template, replies out."""

from collections.abc import AsyncIterator

import jinja2
from fastapi import Request

from ropeway.outputs import CompletionOutput, RequestOutput, TokenLogprob
from ropeway.request_bounds import MAX_TOP_LOGPROBS
from ropeway.sampling_params import InvalidParameter

from .context import ServerContext
from .errors import APIError
from .protocol import (AssistantMessage, ChatChoice, ChatChunkChoice, ChatCompletionChunk, ChatCompletionRequest,
                       ChatCompletionResponse, ChatLogprobs, ChoiceDelta, TokenLogprobContent, TopLogprob, Usage,
                       new_id, now_seconds)
from .streaming import merge, respond
from .usage import response_usage

# Templates written for OpenAI's roles know "system"; "developer" is OpenAI's newer name for it.
_TEMPLATE_ROLE = {"developer": "system"}


async def chat_prompt_ids(ctx: ServerContext, body_messages, add_generation_prompt: bool) -> list[int]:
    messages = []
    for message in body_messages:
        entry = message.template_dict()
        entry["role"] = _TEMPLATE_ROLE.get(entry["role"], entry["role"])
        messages.append(entry)
    try:
        return await ctx.tokenizers.encode_chat(messages, add_generation_prompt=add_generation_prompt)
    except jinja2.TemplateError as error:
        raise APIError.bad_request(f"the chat template refused these messages: {error}", "messages") from error
    except ValueError as error:  # a model without a chat template
        raise APIError.bad_request(str(error), "messages") from error


def logprobs_setting(body: ChatCompletionRequest) -> int | None:
    if body.top_logprobs is not None:
        if not body.logprobs:
            raise APIError.bad_request("top_logprobs needs logprobs set to true", "top_logprobs")
        if not 0 <= body.top_logprobs <= MAX_TOP_LOGPROBS:
            raise APIError.bad_request(f"top_logprobs must be between 0 and {MAX_TOP_LOGPROBS}", "top_logprobs")
    return (body.top_logprobs or 0) if body.logprobs else None


def utf8_bytes(text: str) -> list[int]:
    return list(text.encode("utf-8", errors="replace"))


def chat_logprobs(entries: list[TokenLogprob]) -> ChatLogprobs:
    return ChatLogprobs(content=[
        TokenLogprobContent(token=e.token, logprob=e.logprob, bytes=utf8_bytes(e.token),
                            top_logprobs=[TopLogprob(token=text, logprob=lp, bytes=utf8_bytes(text))
                                          for _, text, lp in e.top])
        for e in entries
    ])


async def create_chat_completion(ctx: ServerContext, body: ChatCompletionRequest, request: Request):
    model = ctx.resolve_model(body.model)
    if body.logit_bias:
        raise APIError.bad_request("logit_bias is not supported", "logit_bias")
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    try:
        params = body.sampling_params(max_tokens, logprobs_setting(body))
    except InvalidParameter as error:
        if error.param == "max_tokens" and body.max_completion_tokens is not None:
            raise APIError.bad_request(str(error).replace("max_tokens", "max_completion_tokens"),
                                       "max_completion_tokens") from error
        raise
    ctx.check_n(params.n)
    prompt_ids = await chat_prompt_ids(ctx, body.messages, body.add_generation_prompt)
    context = body.context_params()
    ctx.check_length(len(prompt_ids), params.max_tokens, "messages", context)
    ctx.require_engine()
    ticket = ctx.gate.admit(params.n)
    response_id = new_id("chatcmpl")
    outputs = ctx.generate(prompt_ids, params, response_id, context)
    stream = ChatStream(body, model, response_id, len(prompt_ids))
    return await respond(request, body.stream, [outputs], lambda: stream.chunks(outputs),
                         lambda finals: stream.response(finals[0]), ticket)


class ChatStream:
    def __init__(self, body: ChatCompletionRequest, model: str, response_id: str, num_prompt_tokens: int):
        self.body, self.model, self.id = body, model, response_id
        self.num_prompt_tokens = num_prompt_tokens
        self.created = now_seconds()

    def _usage(self, final: RequestOutput | None) -> Usage:
        return response_usage(self.num_prompt_tokens, [final])

    def response(self, final: RequestOutput) -> ChatCompletionResponse:
        choices = [ChatChoice(index=c.index, message=AssistantMessage(content=c.text),
                              logprobs=chat_logprobs(c.logprobs) if c.logprobs is not None else None,
                              finish_reason=c.finish_reason, stop_reason=c.stop_reason)
                   for c in final.outputs]
        return ChatCompletionResponse(id=self.id, created=self.created, model=self.model, choices=choices,
                                      usage=self._usage(final))

    def _chunk(self, choices: list[ChatChunkChoice], usage: Usage | None = None) -> ChatCompletionChunk:
        return ChatCompletionChunk(id=self.id, created=self.created, model=self.model, choices=choices, usage=usage)

    @staticmethod
    def _delta_choice(choice: CompletionOutput) -> ChatChunkChoice:
        return ChatChunkChoice(
            index=choice.index,
            delta=ChoiceDelta(content=choice.delta_text) if choice.delta_text else ChoiceDelta(),
            logprobs=chat_logprobs(choice.delta_logprobs) if choice.logprobs is not None else None,
            finish_reason=choice.finish_reason, stop_reason=choice.stop_reason)

    async def chunks(self, outputs: AsyncIterator[RequestOutput]) -> AsyncIterator[ChatCompletionChunk]:
        # As OpenAI does: each choice opens with the role and empty content, before the model has run.
        for index in range(self.body.n):
            yield self._chunk([ChatChunkChoice(index=index, delta=ChoiceDelta(role="assistant", content=""))])
        finish_sent: set[int] = set()
        final = None
        async for _, output in merge([outputs]):
            final = output
            choices = []
            for choice in output.outputs:
                if choice.index in finish_sent or not (choice.delta_text or choice.delta_logprobs
                                                       or choice.finished):
                    continue
                if choice.finished:
                    finish_sent.add(choice.index)
                choices.append(self._delta_choice(choice))
            if choices:
                yield self._chunk(choices)
        if self.body.include_usage_in_stream:
            yield self._chunk([], self._usage(final))
