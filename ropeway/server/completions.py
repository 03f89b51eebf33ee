"""POST /v1/completions: prompts in, text completions out (whole or streamed)."""

from collections.abc import AsyncIterator
from dataclasses import dataclass

from fastapi import Request

from ropeway.outputs import CompletionOutput, RequestOutput, TokenLogprob

from .context import ServerContext
from .errors import APIError
from .protocol import (CompletionChoice, CompletionLogprobs, CompletionRequest, CompletionResponse, Usage,
                       new_id, now_seconds)
from .streaming import merge, respond
from .usage import response_usage


@dataclass
class Prompt:
    text: str | None      # None when the client sent token ids
    token_ids: list[int]

    def echo_text(self, ctx: ServerContext) -> str:
        return self.text if self.text is not None else ctx.tokenizer.decode(self.token_ids)


async def read_prompts(ctx: ServerContext, prompt) -> list[Prompt]:
    if isinstance(prompt, str):
        prompt = [prompt]
    elif prompt and isinstance(prompt[0], int):
        prompt = [prompt]
    if not prompt:
        raise APIError.bad_request("prompt must not be empty", "prompt")
    prompts = []
    for item in prompt:
        if isinstance(item, str):
            prompts.append(Prompt(item, await ctx.tokenizers.encode(item)))
        else:
            ctx.check_token_ids(item, "prompt")
            prompts.append(Prompt(None, list(item)))
    return prompts


def check_supported(body: CompletionRequest) -> None:
    if body.suffix:
        raise APIError.bad_request("suffix is not supported", "suffix")
    if body.best_of is not None and body.best_of != body.n:
        raise APIError.bad_request("best_of is not supported (other than best_of = n)", "best_of")
    if body.logit_bias:
        raise APIError.bad_request("logit_bias is not supported", "logit_bias")
    if body.echo and body.logprobs is not None:
        raise APIError.bad_request("echo together with logprobs is not supported (no prompt logprobs)", "echo")


def completion_logprobs(entries: list[TokenLogprob], start_offset: int) -> CompletionLogprobs:
    logprobs = CompletionLogprobs()
    offset = start_offset
    for entry in entries:
        logprobs.tokens.append(entry.token)
        logprobs.token_logprobs.append(entry.logprob)
        logprobs.top_logprobs.append({text: lp for _, text, lp in entry.top})
        logprobs.text_offset.append(offset)
        offset += len(entry.token)
    return logprobs


async def create_completion(ctx: ServerContext, body: CompletionRequest, request: Request):
    model = ctx.resolve_model(body.model)
    check_supported(body)
    params = body.sampling_params(body.max_tokens, body.logprobs)
    ctx.check_n(params.n)
    prompts = await read_prompts(ctx, body.prompt)
    context = body.context_params()
    for prompt in prompts:
        ctx.check_length(len(prompt.token_ids), params.max_tokens, "prompt", context)
    ctx.require_engine()
    ticket = ctx.gate.admit(params.n * len(prompts), "n" if params.n > 1 else "prompt")
    response_id = new_id("cmpl")
    streams = [ctx.generate(p.token_ids, params, f"{response_id}-{i}", context) for i, p in enumerate(prompts)]
    stream = CompletionStream(ctx, body, model, response_id, prompts)
    return await respond(request, body.stream, streams, lambda: stream.chunks(streams), stream.response, ticket)


class CompletionStream:
    """Turns engine outputs into OpenAI completion objects; choice i of prompt p is index p·n + i."""

    def __init__(self, ctx: ServerContext, body: CompletionRequest, model: str, response_id: str,
                 prompts: list[Prompt]):
        self.ctx, self.body, self.model, self.id = ctx, body, model, response_id
        self.prompts = prompts
        self.created = now_seconds()

    def _index(self, prompt_index: int, choice: CompletionOutput) -> int:
        return prompt_index * self.body.n + choice.index

    def _usage(self, finals: list[RequestOutput | None]) -> Usage:
        return response_usage(sum(len(p.token_ids) for p in self.prompts), finals)

    def response(self, finals: list[RequestOutput]) -> CompletionResponse:
        choices = []
        for prompt_index, output in enumerate(finals):
            echo = self.prompts[prompt_index].echo_text(self.ctx) if self.body.echo else ""
            for choice in output.outputs:
                choices.append(CompletionChoice(
                    index=self._index(prompt_index, choice),
                    text=echo + choice.text,
                    logprobs=completion_logprobs(choice.logprobs, 0) if choice.logprobs is not None else None,
                    finish_reason=choice.finish_reason,
                    stop_reason=choice.stop_reason,
                ))
        choices.sort(key=lambda c: c.index)
        return CompletionResponse(id=self.id, created=self.created, model=self.model, choices=choices,
                                  usage=self._usage(finals))

    def _chunk(self, choices: list[CompletionChoice], usage: Usage | None = None) -> CompletionResponse:
        return CompletionResponse(id=self.id, created=self.created, model=self.model, choices=choices, usage=usage)

    async def chunks(self, streams: list[AsyncIterator[RequestOutput]]) -> AsyncIterator[CompletionResponse]:
        text_sent: dict[int, int] = {}   # choice index -> characters sent (for logprobs' text_offset)
        finish_sent: set[int] = set()
        finals: list[RequestOutput | None] = [None] * len(streams)
        async for prompt_index, output in merge(streams):
            finals[prompt_index] = output
            choices = []
            for choice in output.outputs:
                index = self._index(prompt_index, choice)
                if index in finish_sent:
                    continue
                text = choice.delta_text
                if index not in text_sent and self.body.echo:
                    text = self.prompts[prompt_index].echo_text(self.ctx) + text
                if not (text or choice.delta_logprobs or choice.finished):
                    continue
                offset = text_sent.get(index, 0)
                logprobs = (completion_logprobs(choice.delta_logprobs, offset + len(text) - len(choice.delta_text))
                            if choice.logprobs is not None else None)
                text_sent[index] = offset + len(text)
                if choice.finished:
                    finish_sent.add(index)
                choices.append(CompletionChoice(index=index, text=text, logprobs=logprobs,
                                                finish_reason=choice.finish_reason, stop_reason=choice.stop_reason))
            if choices:
                yield self._chunk(choices)
        if self.body.include_usage_in_stream:
            yield self._chunk([], self._usage(finals))
