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
from .tool_call_stream import ToolCallReader
from .tool_prompt import template_input
from .tool_use import ToolUse, tool_use
from .unsupported_fields import REFUSED_CHAT_FIELDS, REFUSED_MESSAGE_FIELDS, refuse_unsupported
from .usage import response_usage

async def chat_prompt_ids(ctx: ServerContext, body_messages, add_generation_prompt: bool,
                          continue_final_message: bool = False, tools: list[dict] | None = None) -> list[int]:
    for index, message in enumerate(body_messages):
        refuse_unsupported(message.model_extra, REFUSED_MESSAGE_FIELDS, f"messages.{index}.")
    template = ctx.tokenizer.chat_template
    messages, tools = template_input(body_messages, tools, template is not None and template.knows_tools)
    try:
        if not continue_final_message:
            return await ctx.tokenizers.encode_chat(messages, add_generation_prompt, tools)
        return await ctx.tokenizers.encode(continued_chat_text(ctx, messages, tools), add_special_tokens=False)
    except jinja2.TemplateError as error:
        raise APIError.bad_request(f"the chat template refused these messages: {error}", "messages") from error
    except ValueError as error:  # a model without a chat template
        raise APIError.bad_request(str(error), "messages") from error


def continued_chat_text(ctx: ServerContext, messages: list[dict], tools: list[dict] | None) -> str:
    """The conversation rendered up to the end of the last message's content, without the
    end-of-turn the template writes after it, so the reply continues that message (vLLM's
    continue_final_message)."""
    final = messages[-1]
    if final["role"] != "assistant" or not final["content"]:
        raise APIError.bad_request("continue_final_message needs a last message from the assistant with content",
                                   "continue_final_message")
    text = ctx.tokenizer.apply_chat_template(messages, add_generation_prompt=False, tools=tools)
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


def check_supported(body: ChatCompletionRequest) -> ToolUse | None:
    """The request's tool use, once every field is known to be supported."""
    refuse_unsupported(body.model_extra, REFUSED_CHAT_FIELDS)
    tools = tool_use(body)
    if body.continue_final_message and body.add_generation_prompt:
        raise APIError.bad_request("continue_final_message needs add_generation_prompt set to false",
                                   "continue_final_message")
    if body.prompt_logprobs is not None and body.stream:
        raise APIError.bad_request("prompt_logprobs is not supported with stream: true", "prompt_logprobs")
    return tools


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
    tools = check_supported(body)
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    try:
        params = body.sampling_params(max_tokens, logprobs_setting(body), ctx.vocab_size)
    except InvalidParameter as error:
        if error.param == "max_tokens" and body.max_completion_tokens is not None:
            raise APIError.bad_request(str(error).replace("max_tokens", "max_completion_tokens"),
                                       "max_completion_tokens") from error
        raise
    constraint = tools.constraint() if tools is not None else None
    if constraint is not None:  # tool_choice "required" or a named function
        if params.structured_outputs is not None:
            raise APIError.bad_request("tool_choice 'required' or a named function constrains the reply itself; it "
                                       "cannot be combined with response_format or structured_outputs", "tool_choice")
        params.structured_outputs = constraint
    ctx.check_n(params.n)
    prompt_ids = await chat_prompt_ids(ctx, body.messages, body.add_generation_prompt, body.continue_final_message,
                                       tools.tools if tools is not None else None)
    prompt_ids = body.truncated(prompt_ids, ctx.max_model_len)
    context = body.context_params()
    ctx.check_length(len(prompt_ids), params.max_tokens, "messages", context)
    await ctx.check_structured_outputs(params)
    ctx.require_engine()
    ticket = ctx.gate.admit(params.n)
    response_id = new_id("chatcmpl")
    outputs = ctx.generate(prompt_ids, params, response_id, context)
    stream = ChatStream(ctx, body, model, response_id, len(prompt_ids), tools)
    return await respond(request, body.stream, [outputs], lambda: stream.chunks(outputs),
                         lambda finals: stream.response(finals[0]), ticket)


def _finish_reason(choice: CompletionOutput, made_calls: bool) -> str | None:
    # A reply that ended by itself after calling tools ends "tool_calls", as OpenAI's do.
    return "tool_calls" if made_calls and choice.finish_reason == "stop" else choice.finish_reason


class ChatStream:
    def __init__(self, ctx: ServerContext, body: ChatCompletionRequest, model: str, response_id: str,
                 num_prompt_tokens: int, tools: ToolUse | None):
        self.ctx, self.body, self.model, self.id = ctx, body, model, response_id
        self.num_prompt_tokens = num_prompt_tokens
        self.name = token_name(body.return_tokens_as_token_ids)
        self.created = now_seconds()
        parser = tools.parser() if tools is not None else None
        # One reader per choice: each streams its own calls.
        self.readers = [ToolCallReader(parser, tools.max_calls) for _ in range(body.n)] if parser else None

    def _message(self, choice: CompletionOutput) -> tuple[AssistantMessage, bool]:
        if self.readers is None:
            return AssistantMessage(content=choice.text), False
        content, calls = self.readers[choice.index].message(choice.text)
        return AssistantMessage(content=content, tool_calls=calls or None), bool(calls)

    def _usage(self, final: RequestOutput | None) -> Usage:
        return response_usage(self.num_prompt_tokens, [final])

    def _logprobs(self, entries: list[TokenLogprob] | None) -> ChatLogprobs | None:
        return chat_logprobs(entries, self.name) if entries is not None else None

    def response(self, final: RequestOutput) -> ChatCompletionResponse:
        choices = []
        for c in final.outputs:
            message, made_calls = self._message(c)
            choices.append(ChatChoice(index=c.index, message=message, logprobs=self._logprobs(c.logprobs),
                                      finish_reason=_finish_reason(c, made_calls), stop_reason=c.stop_reason))
        prompt_logprobs = None
        if self.body.prompt_logprobs is not None:
            entries = prompt_entries(final, self.ctx.tokenizer.token_to_text, self.body.prompt_logprobs)
            prompt_logprobs = vllm_prompt_logprobs(entries, self.name)
        return ChatCompletionResponse(id=self.id, created=self.created, model=self.model, choices=choices,
                                      usage=self._usage(final), prompt_logprobs=prompt_logprobs)

    def _chunk(self, choices: list[ChatChunkChoice], usage: Usage | None = None) -> ChatCompletionChunk:
        return ChatCompletionChunk(id=self.id, created=self.created, model=self.model, choices=choices, usage=usage)

    def _delta(self, choice: CompletionOutput) -> tuple[ChoiceDelta, bool]:
        """The choice's delta, and whether it has made tool calls so far."""
        if self.readers is None:
            return (ChoiceDelta(content=choice.delta_text) if choice.delta_text else ChoiceDelta()), False
        reader = self.readers[choice.index]
        content, pieces = reader.step(choice.text, choice.finished)
        return ChoiceDelta(content=content or None, tool_calls=pieces or None), reader.made_calls

    def _delta_choice(self, choice: CompletionOutput) -> ChatChunkChoice | None:
        """None when the step settled nothing to send."""
        delta, made_calls = self._delta(choice)
        logprobs = self._logprobs(choice.delta_logprobs if choice.logprobs is not None else None)
        if delta.content is None and delta.tool_calls is None and logprobs is None and not choice.finished:
            return None
        return ChatChunkChoice(index=choice.index, delta=delta, logprobs=logprobs,
                               finish_reason=_finish_reason(choice, made_calls), stop_reason=choice.stop_reason)

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
                delta_choice = self._delta_choice(choice)
                if delta_choice is not None:
                    yield self._chunk([delta_choice])
        if self.body.include_usage_in_stream:
            yield self._chunk([], self._usage(final))
