"""POST /v1/chat/completions: messages through the model's chat template, replies out."""

from collections.abc import AsyncIterator

import jinja2
from fastapi import Request

from ropeway.outputs import CompletionOutput, RequestOutput, TokenLogprob
from ropeway.request_bounds import MAX_TOP_LOGPROBS
from ropeway.sampling_params import InvalidParameter

from .context import ServerContext
from .errors import APIError
from .prompt_logprobs import TokenName, prompt_entries, token_name, vllm_prompt_logprobs
from .protocol import (AssistantMessage, ChatChoice, ChatChunkChoice, ChatCompletionChunk, ChatCompletionRequest,
                       ChatCompletionResponse, ChatLogprobs, ChoiceDelta, TokenLogprobContent, TopLogprob, Usage,
                       new_id, now_seconds)
from .streaming import merge, respond
from .unsupported_fields import REFUSED_CHAT_FIELDS, REFUSED_MESSAGE_FIELDS, refuse_unsupported
from .usage import response_usage

# Templates written for OpenAI's roles know "system"; "developer" is OpenAI's newer name for it.
_TEMPLATE_ROLE = {"developer": "system"}


async def chat_prompt_ids(ctx: ServerContext, body_messages, add_generation_prompt: bool,
                          continue_final_message: bool = False) -> list[int]:
    messages = []
    for index, message in enumerate(body_messages):
        refuse_unsupported(message.model_extra, REFUSED_MESSAGE_FIELDS, f"messages.{index}.")
        entry = message.template_dict()
        entry["role"] = _TEMPLATE_ROLE.get(entry["role"], entry["role"])
        messages.append(entry)
    try:
        if not continue_final_message:
            return await ctx.tokenizers.encode_chat(messages, add_generation_prompt=add_generation_prompt)
        return await ctx.tokenizers.encode(continued_chat_text(ctx, messages), add_special_tokens=False)
    except jinja2.TemplateError as error:
        raise APIError.bad_request(f"the chat template refused these messages: {error}", "messages") from error
    except ValueError as error:  # a model without a chat template
        raise APIError.bad_request(str(error), "messages") from error


def continued_chat_text(ctx: ServerContext, messages: list[dict]) -> str:
    """The conversation rendered up to the end of the last message's content, without the
    end-of-turn the template writes after it, so the reply continues that message (vLLM's
    continue_final_message)."""
    final = messages[-1]
    if final["role"] != "assistant" or not final["content"]:
        raise APIError.bad_request("continue_final_message needs a last message from the assistant with content",
                                   "continue_final_message")
    text = ctx.tokenizer.apply_chat_template(messages, add_generation_prompt=False)
    end = text.rfind(final["content"])
    if end == -1:
        raise APIError.bad_request("the chat template does not write the last message's content verbatim",
                                   "continue_final_message")
    return text[: end + len(final["content"])]


def logprobs_setting(body: ChatCompletionRequest) -> int | None:
    if body.top_logprobs is not None:
        if not body.logprobs:
            raise APIError.bad_request("top_logprobs needs logprobs set to true", "top_logprobs")
        if not 0 <= body.top_logprobs <= MAX_TOP_LOGPROBS:
            raise APIError.bad_request(f"top_logprobs must be between 0 and {MAX_TOP_LOGPROBS}", "top_logprobs")
    return (body.top_logprobs or 0) if body.logprobs else None


def check_supported(body: ChatCompletionRequest) -> None:
    refuse_unsupported(body.model_extra, REFUSED_CHAT_FIELDS)
    if body.continue_final_message and body.add_generation_prompt:
        raise APIError.bad_request("continue_final_message needs add_generation_prompt set to false",
                                   "continue_final_message")
    if body.prompt_logprobs is not None and body.stream:
        raise APIError.bad_request("prompt_logprobs is not supported with stream: true", "prompt_logprobs")


def utf8_bytes(text: str) -> list[int]:
    return list(text.encode("utf-8", errors="replace"))


def chat_logprobs(entries: list[TokenLogprob], name: TokenName) -> ChatLogprobs:
    def top_logprob(token_id: int, text: str, logprob: float) -> TopLogprob:
        shown = name(token_id, text)
        return TopLogprob(token=shown, logprob=logprob, bytes=utf8_bytes(shown))

    content = []
    for e in entries:
        token = name(e.token_id, e.token)
        content.append(TokenLogprobContent(token=token, logprob=e.logprob, bytes=utf8_bytes(token),
                                           top_logprobs=[top_logprob(*top) for top in e.top]))
    return ChatLogprobs(content=content)


async def create_chat_completion(ctx: ServerContext, body: ChatCompletionRequest, request: Request):
    model = ctx.resolve_model(body.model)
    check_supported(body)
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    try:
        params = body.sampling_params(max_tokens, logprobs_setting(body), ctx.vocab_size)
    except InvalidParameter as error:
        if error.param == "max_tokens" and body.max_completion_tokens is not None:
            raise APIError.bad_request(str(error).replace("max_tokens", "max_completion_tokens"),
                                       "max_completion_tokens") from error
        raise
    ctx.check_n(params.n)
    prompt_ids = await chat_prompt_ids(ctx, body.messages, body.add_generation_prompt, body.continue_final_message)
    prompt_ids = body.truncated(prompt_ids, ctx.max_model_len)
    context = body.context_params()
    ctx.check_length(len(prompt_ids), params.max_tokens, "messages", context)
    await ctx.check_structured_outputs(params)
    ctx.require_engine()
    ticket = ctx.gate.admit(params.n)
    response_id = new_id("chatcmpl")
    outputs = ctx.generate(prompt_ids, params, response_id, context)
    stream = ChatStream(ctx, body, model, response_id, len(prompt_ids))
    return await respond(request, body.stream, [outputs], lambda: stream.chunks(outputs),
                         lambda finals: stream.response(finals[0]), ticket)


class ChatStream:
    def __init__(self, ctx: ServerContext, body: ChatCompletionRequest, model: str, response_id: str,
                 num_prompt_tokens: int):
        self.ctx, self.body, self.model, self.id = ctx, body, model, response_id
        self.num_prompt_tokens = num_prompt_tokens
        self.name = token_name(body.return_tokens_as_token_ids)
        self.created = now_seconds()

    def _usage(self, final: RequestOutput | None) -> Usage:
        return response_usage(self.num_prompt_tokens, [final])

    def _logprobs(self, entries: list[TokenLogprob] | None) -> ChatLogprobs | None:
        return chat_logprobs(entries, self.name) if entries is not None else None

    def response(self, final: RequestOutput) -> ChatCompletionResponse:
        choices = [ChatChoice(index=c.index, message=AssistantMessage(content=c.text),
                              logprobs=self._logprobs(c.logprobs), finish_reason=c.finish_reason,
                              stop_reason=c.stop_reason)
                   for c in final.outputs]
        prompt_logprobs = None
        if self.body.prompt_logprobs is not None:
            entries = prompt_entries(final, self.ctx.tokenizer.token_to_text, self.body.prompt_logprobs)
            prompt_logprobs = vllm_prompt_logprobs(entries, self.name)
        return ChatCompletionResponse(id=self.id, created=self.created, model=self.model, choices=choices,
                                      usage=self._usage(final), prompt_logprobs=prompt_logprobs)

    def _chunk(self, choices: list[ChatChunkChoice], usage: Usage | None = None) -> ChatCompletionChunk:
        return ChatCompletionChunk(id=self.id, created=self.created, model=self.model, choices=choices, usage=usage)

    def _delta_choice(self, choice: CompletionOutput) -> ChatChunkChoice:
        return ChatChunkChoice(
            index=choice.index,
            delta=ChoiceDelta(content=choice.delta_text) if choice.delta_text else ChoiceDelta(),
            logprobs=self._logprobs(choice.delta_logprobs if choice.logprobs is not None else None),
            finish_reason=choice.finish_reason, stop_reason=choice.stop_reason)

    async def chunks(self, outputs: AsyncIterator[RequestOutput]) -> AsyncIterator[ChatCompletionChunk]:
        """One choice per chunk, as OpenAI streams several choices: clients read choices[0]."""
        # As OpenAI does: each choice opens with the role and empty content, before the model has run.
        for index in range(self.body.n):
            yield self._chunk([ChatChunkChoice(index=index, delta=ChoiceDelta(role="assistant", content=""))])
        finish_sent: set[int] = set()
        final = None
        async for _, output in merge([outputs]):
            final = output
            for choice in output.outputs:
                if choice.index in finish_sent or not (choice.delta_text or choice.delta_logprobs
                                                       or choice.finished):
                    continue
                if choice.finished:
                    finish_sent.add(choice.index)
                yield self._chunk([self._delta_choice(choice)])
        if self.body.include_usage_in_stream:
            yield self._chunk([], self._usage(final))
