"""POST /v1/completions: prompts in, text completions out (whole or streamed)."""

from collections.abc import AsyncIterator
from dataclasses import dataclass

from fastapi import Request

from ropeway.outputs import CompletionOutput, RequestOutput, TokenLogprob

from .context import ServerContext
from .errors import APIError
from .prompt_logprobs import TokenName, prompt_entries, token_name, vllm_prompt_logprobs, with_prompt_logprobs
from .protocol import (CompletionChoice, CompletionLogprobs, CompletionRequest, CompletionResponse, Usage,
                       new_id, now_seconds)
from .streaming import merge, respond
from .unsupported_fields import refuse_unsupported
from .usage import response_usage


@dataclass
class Prompt:
    text: str | None      # None when the client sent token ids, or the prompt was truncated
    token_ids: list[int]

    def echo_text(self, ctx: ServerContext) -> str:
        return self.text if self.text is not None else ctx.tokenizer.decode(self.token_ids)


async def read_prompts(ctx: ServerContext, body: CompletionRequest) -> list[Prompt]:
    prompt = body.prompt
    if isinstance(prompt, str):
        prompt = [prompt]
    elif prompt and isinstance(prompt[0], int):
        prompt = [prompt]
    if not prompt:
        raise APIError.bad_request("prompt must not be empty", "prompt")
    prompts = []
    for item in prompt:
        if isinstance(item, str):
            text, token_ids = item, await ctx.tokenizers.encode(item)
        else:
            ctx.check_token_ids(item, "prompt")
            text, token_ids = None, list(item)
        kept = body.truncated(token_ids, ctx.max_model_len)
        prompts.append(Prompt(text if len(kept) == len(token_ids) else None, kept))
    return prompts


def check_supported(body: CompletionRequest) -> None:
    refuse_unsupported(body.model_extra)
    if body.suffix:
        raise APIError.bad_request("suffix is not supported", "suffix")
    if body.best_of is not None and body.best_of != body.n:
        raise APIError.bad_request("best_of is not supported (other than best_of = n)", "best_of")


def scores_prompt_only(body: CompletionRequest) -> bool:
    """max_tokens 0: the reply is the prompt (echo) and its logprobs, as log-likelihood
    scoring asks; the engine still samples one token, which nobody sees (as in vLLM)."""
    if body.max_tokens != 0:
        return False
    if not (body.echo or body.prompt_logprobs is not None):
        raise APIError.bad_request("max_tokens must be at least 1 (0 only with echo or prompt_logprobs, "
                                   "to score the prompt)", "max_tokens")
    return True


def completion_logprobs(entries: list[TokenLogprob], start_offset: int, name: TokenName) -> CompletionLogprobs:
    """OpenAI's shape: each token with up to k + 1 alternatives (the top k and the token itself);
    null for an echoed prompt's first token, which has no logprob."""
    logprobs = CompletionLogprobs()
    offset = start_offset
    for entry in entries:
        logprobs.tokens.append(name(entry.token_id, entry.token))
        logprobs.token_logprobs.append(entry.logprob)
        if entry.logprob is None:
            logprobs.top_logprobs.append(None)
        else:
            top = {name(t, text): lp for t, text, lp in entry.top}
            top.setdefault(name(entry.token_id, entry.token), entry.logprob)
            logprobs.top_logprobs.append(top)
        logprobs.text_offset.append(offset)
        offset += len(entry.token)
    return logprobs


async def create_completion(ctx: ServerContext, body: CompletionRequest, request: Request):
    model = ctx.resolve_model(body.model)
    check_supported(body)
    prompt_only = scores_prompt_only(body)
    if body.prompt_logprobs is not None and body.stream:
        raise APIError.bad_request("prompt_logprobs is not supported with stream: true", "prompt_logprobs")
    params = body.sampling_params(1 if prompt_only else body.max_tokens, body.logprobs, ctx.vocab_size)
    if prompt_only and params.structured_outputs is not None:
        raise APIError.bad_request("structured outputs need max_tokens of at least 1 (max_tokens 0 only scores "
                                   "the prompt)", "max_tokens")
    if body.echo and body.logprobs is not None:
        params = with_prompt_logprobs(params, body.logprobs)
    ctx.check_n(params.n)
    prompts = await read_prompts(ctx, body)
    context = body.context_params()
    for prompt in prompts:
        ctx.check_length(len(prompt.token_ids), params.max_tokens, "prompt", context)
    await ctx.check_structured_outputs(params)
    ctx.require_engine()
    ticket = ctx.gate.admit(params.n * len(prompts), "n" if params.n > 1 else "prompt")
    response_id = new_id("cmpl")
    streams = [ctx.generate(p.token_ids, params, f"{response_id}-{i}", context) for i, p in enumerate(prompts)]
    stream = CompletionStream(ctx, body, model, response_id, prompts, prompt_only)
    return await respond(request, body.stream, streams, lambda: stream.chunks(streams), stream.response, ticket)


class CompletionStream:
    """Turns engine outputs into OpenAI completion objects; choice i of prompt p is index p·n + i."""

    def __init__(self, ctx: ServerContext, body: CompletionRequest, model: str, response_id: str,
                 prompts: list[Prompt], prompt_only: bool):
        self.ctx, self.body, self.model, self.id = ctx, body, model, response_id
        self.prompts = prompts
        self.prompt_only = prompt_only
        self.name = token_name(body.return_tokens_as_token_ids)
        self.created = now_seconds()

    def _index(self, prompt_index: int, choice: CompletionOutput) -> int:
        return prompt_index * self.body.n + choice.index

    def _usage(self, finals: list[RequestOutput | None]) -> Usage:
        return response_usage(sum(len(p.token_ids) for p in self.prompts), finals, self.prompt_only)

    def _echo(self, prompt_index: int, output: RequestOutput) -> tuple[str, list[TokenLogprob]]:
        """What a choice starts with under echo: the prompt's text, and its logprobs if asked."""
        if not self.body.echo:
            return "", []
        text = self.prompts[prompt_index].echo_text(self.ctx)
        if self.body.logprobs is None:
            return text, []
        return text, prompt_entries(output, self.ctx.tokenizer.token_to_text, self.body.logprobs)

    def _prompt_logprobs(self, output: RequestOutput):
        if self.body.prompt_logprobs is None:
            return None
        entries = prompt_entries(output, self.ctx.tokenizer.token_to_text, self.body.prompt_logprobs)
        return vllm_prompt_logprobs(entries, self.name)

    def _choice(self, prompt_index: int, output: RequestOutput, choice: CompletionOutput, first: bool,
                text: str, entries: list[TokenLogprob], offset: int) -> CompletionChoice:
        """One choice (or its next piece, streaming): the echo goes in front of the first piece."""
        finish_reason, stop_reason = choice.finish_reason, choice.stop_reason
        if self.prompt_only:
            text, entries = "", []
            finish_reason, stop_reason = ("length" if choice.finished else None), None
        prompt_logprobs = None
        if first:
            echo_text, echo_entries = self._echo(prompt_index, output)
            text, entries = echo_text + text, echo_entries + entries
            prompt_logprobs = self._prompt_logprobs(output)
        wants_logprobs = self.body.logprobs is not None
        return CompletionChoice(
            index=self._index(prompt_index, choice), text=text,
            logprobs=completion_logprobs(entries, offset, self.name) if wants_logprobs else None,
            finish_reason=finish_reason, stop_reason=stop_reason, prompt_logprobs=prompt_logprobs)

    def response(self, finals: list[RequestOutput]) -> CompletionResponse:
        choices = [self._choice(prompt_index, output, choice, True, choice.text, choice.logprobs or [], 0)
                   for prompt_index, output in enumerate(finals) for choice in output.outputs]
        choices.sort(key=lambda c: c.index)
        return CompletionResponse(id=self.id, created=self.created, model=self.model, choices=choices,
                                  usage=self._usage(finals))

    def _chunk(self, choices: list[CompletionChoice], usage: Usage | None = None) -> CompletionResponse:
        return CompletionResponse(id=self.id, created=self.created, model=self.model, choices=choices, usage=usage)

    async def chunks(self, streams: list[AsyncIterator[RequestOutput]]) -> AsyncIterator[CompletionResponse]:
        """One choice per chunk, as OpenAI streams several choices: clients read choices[0]."""
        text_sent: dict[int, int] = {}   # choice index -> characters sent (for logprobs' text_offset)
        finish_sent: set[int] = set()
        finals: list[RequestOutput | None] = [None] * len(streams)
        async for prompt_index, output in merge(streams):
            finals[prompt_index] = output
            for choice in output.outputs:
                index = self._index(prompt_index, choice)
                first = index not in text_sent
                if index in finish_sent or not (first or choice.delta_text or choice.delta_logprobs
                                                or choice.finished):
                    continue
                if self.prompt_only and not choice.finished:
                    continue
                piece = self._choice(prompt_index, output, choice, first, choice.delta_text, choice.delta_logprobs,
                                     text_sent.get(index, 0))
                text_sent[index] = text_sent.get(index, 0) + len(piece.text)
                if choice.finished:
                    finish_sent.add(index)
                yield self._chunk([piece])
        if self.body.include_usage_in_stream:
            yield self._chunk([], self._usage(finals))
