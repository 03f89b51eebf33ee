"""The synchronous engine: requests in, one scheduler step and one model step at a time."""

import itertools
import logging
import random
import time
from dataclasses import dataclass

import torch

from ropeway.config import EngineConfig
from ropeway.kernels import is_long_chunk, warm_up_long_chunk_attention
from ropeway.models import LlamaModel, RopewayTokenizer, load_model_files
from ropeway.outputs import RequestOutput, TokenLogprob
from ropeway.sampling_params import InvalidParameter, SamplingParams
from ropeway.context_params import ContextParams
from ropeway.scheduler import (BlockManager, ContextPolicy, RopePlanner, RopeScaling, Scheduler, SchedulerConfig,
                               SchedulerOutput, Sequence)

from .detokenizer import IncrementalDetokenizer
from .kv_pool import allocate_kv_cache, plan_kv_pool
from .model_runner import ModelRunner
from .request_state import ChoiceState, RequestState
from .sampler import SamplingRow, has_penalty, is_plain_argmax, sample
from .sampling_state import PenaltyState

log = logging.getLogger("ropeway")

_SEED_MASK = (1 << 63) - 1
_GOLDEN = 0x9E3779B97F4A7C15


@dataclass
class EngineCounters:
    """Monotonic totals since start-up (the server exports them as Prometheus counters)."""
    prompt_tokens: int = 0       # prompt tokens of admitted requests
    generation_tokens: int = 0   # sampled tokens
    steps: int = 0


# In a sequence's token ids: the token a launched step samples on the device, not read yet.
PLACEHOLDER = -1


@dataclass
class InFlightStep:
    """A launched step whose greedy tokens are still on the device (asynchronous scheduling)."""
    samplers: list[Sequence]
    tokens: torch.Tensor  # [len(samplers)] int64 on the device, row i for samplers[i]
    # On CUDA: a pinned copy of tokens and the event after its copy. Reading the device tensor
    # itself would wait for everything queued behind it, the next step included.
    host_tokens: torch.Tensor | None = None
    copied: torch.cuda.Event | None = None

    @classmethod
    def launched(cls, samplers: list[Sequence], tokens: torch.Tensor) -> "InFlightStep":
        if not tokens.is_cuda:
            return cls(samplers, tokens)
        host_tokens = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=True)
        host_tokens.copy_(tokens, non_blocking=True)
        copied = torch.cuda.Event()
        copied.record()
        return cls(samplers, tokens, host_tokens, copied)

    def read(self) -> list[int]:
        if self.copied is None:
            return self.tokens.tolist()
        self.copied.synchronize()
        return self.host_tokens.tolist()

    def rows(self) -> dict[int, int]:
        return {seq.seq_id: row for row, seq in enumerate(self.samplers)}


@dataclass
class LoadedModel:
    """Weights on the device and the tokenizer: what several engines can share (tests do)."""
    model: LlamaModel
    tokenizer: RopewayTokenizer
    seconds: float


def load_model(config: EngineConfig) -> LoadedModel:
    started = time.perf_counter()
    device = config.torch_device()
    model_config, weights, tokenizer = load_model_files(config.model, config.torch_dtype(device))
    model = LlamaModel(model_config, weights, device)
    return LoadedModel(model, tokenizer, time.perf_counter() - started)


class LLMEngine:
    def __init__(self, config: EngineConfig, loaded: LoadedModel | None = None):
        self.config = config
        loaded = loaded or load_model(config)
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.model_config = model_config = self.model.config
        self.device = self.model.device
        self.dtype = self.model.dtype
        self.pool = plan_kv_pool(model_config, self.dtype, self.device, config.block_size,
                                 config.kv_cache_memory_bytes, config.gpu_memory_utilization)
        self.rope_scaling = self._server_rope_scaling(config, model_config)
        try:
            self.context_policy = ContextPolicy.from_dict(config.context_policy, "--context-policy")
        except InvalidParameter as error:
            raise ValueError(f"{error.param}: {error}") from error
        wanted_len = config.max_model_len or self.rope_scaling.context_limit(model_config.max_position_embeddings)
        # One sequence must always fit in the pool on its own, or preemption could not help it.
        self.max_model_len = min(wanted_len, self.pool.num_tokens)
        if self.max_model_len < wanted_len:
            log.warning("max_model_len lowered from %d to %d tokens: the KV pool holds no more",
                        wanted_len, self.max_model_len)
        self.kv_cache = allocate_kv_cache(model_config, self.pool, self.dtype, self.device)
        self.block_manager = BlockManager(self.pool.num_blocks, config.block_size, config.enable_prefix_caching)
        budget = config.max_num_batched_tokens
        self.planner = RopePlanner(model_config.rope_theta, model_config.head_dim,
                                   model_config.max_position_embeddings, self.rope_scaling)
        self.scheduler = Scheduler(
            SchedulerConfig(max_num_seqs=config.max_num_seqs, max_num_batched_tokens=budget,
                            prefill_chunk_size=min(config.prefill_chunk_size or budget, budget)),
            self.block_manager, self.planner,
            session_store_blocks=int(self.pool.num_blocks * config.session_store_fraction),
        )
        self.runner = ModelRunner(self.model, self.kv_cache, config.block_size, config.retrieval_archive_bytes)
        self.penalty_state = PenaltyState(model_config.vocab_size, self.device)
        if is_long_chunk(self.scheduler.config.prefill_chunk_size):
            # Chunks this long can reach cuDNN: load it now, not inside a first long prompt.
            warm_up_long_chunk_attention(self.device, self.dtype, model_config.num_heads,
                                         model_config.num_kv_heads, model_config.head_dim)
        self.default_rope_plan = self.planner.model_plan
        self.requests: dict[str, RequestState] = {}
        self.counters = EngineCounters()
        self.async_scheduling = config.uses_async_scheduling(self.device)
        self._in_flight: InFlightStep | None = None
        self._arrivals = itertools.count()
        self._seq_ids = itertools.count()
        self._seed_source = random.Random(config.seed)
        log.info("model %s (%s, %d layers) on %s in %s, loaded in %.1f s", model_config.name,
                 model_config.architecture, model_config.num_layers, self.device,
                 str(self.dtype).removeprefix("torch."), loaded.seconds)
        if not self.rope_scaling.is_none:
            log.info("RoPE scaling %s", self.rope_scaling)
        log.info("KV pool: %d blocks of %d tokens = %d tokens, %.1f MiB; max_model_len %d",
                 self.pool.num_blocks, self.pool.block_size, self.pool.num_tokens,
                 self.pool.num_bytes / 2**20, self.max_model_len)

    @staticmethod
    def _server_rope_scaling(config: EngineConfig, model_config) -> RopeScaling:
        """The server flag's scaling if given, else the model's own; bad values stop start-up."""
        try:
            model_scaling = RopeScaling.from_dict(model_config.rope_scaling or None, "model rope_scaling")
            if config.rope_scaling is None:
                return model_scaling
            return RopeScaling.from_dict(config.rope_scaling, "--rope-scaling")
        except InvalidParameter as error:
            raise ValueError(f"{error.param}: {error}") from error

    def capture_decode_graphs(self) -> None:
        """On CUDA, capture the decode graphs of every batch size the server may run now,
        at start-up, instead of on a batch size's first use mid-stream."""
        if self.runner.decode_graphs is None:
            return
        started = time.perf_counter()
        count = self.runner.decode_graphs.capture_up_to(self.config.max_num_seqs)
        log.info("captured %d decode CUDA graphs in %.1f s", count, time.perf_counter() - started)

    # ----- requests -----

    def request_context_policy(self, context: ContextParams | None) -> ContextPolicy:
        if context is None or context.context_policy is None:
            return self.context_policy
        return ContextPolicy.from_dict(context.context_policy, "context_policy")

    def request_rope_scaling(self, context: ContextParams | None) -> RopeScaling | None:
        if context is None or context.rope_scaling is None:
            return None
        return RopeScaling.from_dict(context.rope_scaling, "rope_scaling")

    def context_limit(self, scaling: RopeScaling | None) -> int:
        """The longest sequence a request may reach: the server's limit, or less under a
        request's own scaling."""
        if scaling is None:
            return self.max_model_len
        return min(self.max_model_len, scaling.context_limit(self.model_config.max_position_embeddings))

    def check_length(self, num_prompt_tokens: int, max_tokens: int | None, param: str = "prompt",
                     context: ContextParams | None = None) -> None:
        """Refuse what cannot fit in the context limit, with the message OpenAI clients expect."""
        if num_prompt_tokens == 0:
            raise InvalidParameter(param, "the prompt is empty")
        policy = self.request_context_policy(context)
        if policy.bounded:
            if policy.max_cache_tokens(self.config.block_size) > self.max_model_len:
                raise InvalidParameter("context_policy.window", f"sinks + window ({policy.sinks} + {policy.window}) "
                                       f"exceed the server's context of {self.max_model_len} tokens")
            return  # a bounded cache streams through any length in constant memory
        limit = self.context_limit(self.request_rope_scaling(context))
        requested = num_prompt_tokens + (max_tokens or 1)
        if requested > limit:
            detail = (f" ({num_prompt_tokens} in the prompt, {max_tokens} in the completion)"
                      if max_tokens else "")
            raise InvalidParameter(param, f"This model's maximum context length is {limit} tokens; "
                                          f"your request has {requested}{detail}. Shorten the prompt or max_tokens.")

    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams,
                    context: ContextParams | None = None) -> None:
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        if isinstance(prompt, str):
            text, token_ids = prompt, self.tokenizer.encode(prompt)
        else:
            text, token_ids = None, list(prompt)
            vocab = self.model_config.vocab_size
            if any(not isinstance(t, int) or not 0 <= t < vocab for t in token_ids):
                raise InvalidParameter("prompt", f"token ids must be integers in [0, {vocab})")
        self.check_length(len(token_ids), params.max_tokens, context=context)
        if params.logit_bias and max(params.logit_bias) >= self.model_config.vocab_size:
            raise InvalidParameter("logit_bias", f"logit_bias keys must be token ids in "
                                                 f"[0, {self.model_config.vocab_size})")
        scaling = self.request_rope_scaling(context)
        policy = self.request_context_policy(context)
        limit = self.context_limit(scaling)
        if policy.bounded:
            # Unbounded stream, bounded cache: the plan is sized for the cache, not the stream.
            max_total = len(token_ids) + (params.max_tokens or limit)
            planned = min(len(token_ids) + (params.max_tokens or 0), policy.max_cache_tokens(self.config.block_size))
        else:
            max_total = min(len(token_ids) + (params.max_tokens or limit), limit)
            planned = min(len(token_ids) + (params.max_tokens or 0), limit)
        arrival = next(self._arrivals)
        choices = []
        for index in range(params.n):
            seq = Sequence(seq_id=next(self._seq_ids), request_id=request_id, choice_index=index,
                           prompt_token_ids=token_ids, rope_plan=None, arrival=arrival,
                           max_total_tokens=max_total, planned_length=planned, rope_scaling=scaling,
                           context_policy=policy, wants_prompt_logprobs=params.prompt_logprobs and index == 0)
            choices.append(ChoiceState(
                seq=seq,
                detokenizer=IncrementalDetokenizer(self.tokenizer, token_ids, params.stop,
                                                   params.include_stop_str_in_output, params.skip_special_tokens),
                seed=self._choice_seed(params.seed, index),
                logprobs=[] if params.logprobs is not None else None,
            ))
        self.requests[request_id] = RequestState(request_id, text, token_ids, params, choices,
                                                 prompt_logprobs=[None] if params.prompt_logprobs else None)
        self.scheduler.add([c.seq for c in choices])
        self.counters.prompt_tokens += len(token_ids)

    def _choice_seed(self, seed: int | None, index: int) -> int:
        if seed is None:
            return self._seed_source.getrandbits(63)
        return (seed + index * _GOLDEN) & _SEED_MASK

    def abort_request(self, request_id: str) -> RequestOutput | None:
        """Stop a request and free its blocks now; returns its last output (finish_reason 'abort')."""
        state = self.requests.pop(request_id, None)
        if state is None:
            return None
        for choice in state.choices:
            if choice.finish_reason is None:
                choice.finish_reason = "abort"
                self.scheduler.finish(choice.seq)
                self.penalty_state.release(choice.seq.seq_id)
                if choice.seq.token_ids[-1] == PLACEHOLDER:  # its step is in flight: the token is dropped
                    choice.seq.token_ids.pop()
        return state.make_output()

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    # ----- one step -----

    def step(self) -> list[RequestOutput]:
        """Run one batch; return an output for every request that progressed.

        With asynchronous scheduling, a step whose sequences all sample greedily (no
        logprobs, penalties, prompt logprobs or bounded caches) leaves its tokens on the
        device: each sampling sequence gets a PLACEHOLDER token, the next step is scheduled
        and launched with those inputs taken from the device, and only then are the tokens
        read (the GPU already busy with the next step) and checked for stops. Outputs thus
        come one step later; a sequence that stopped has computed one token too many, which
        is dropped."""
        plan = self.scheduler.schedule()
        pending, self._in_flight = self._in_flight, None
        if plan.is_empty:
            return self._resolve(pending) if pending else []
        now = time.monotonic()
        for item in plan.scheduled:
            metrics = self.requests[item.seq.request_id].metrics
            if metrics.first_scheduled_time is None:
                metrics.first_scheduled_time = now
        samplers = [item.seq for item in plan.scheduled if item.samples]
        logit_rows = self.runner.logit_rows(plan)
        pipelined = self._can_pipeline(plan, samplers)
        logits = self.runner.execute(plan, logit_rows,
                                     (pending.tokens, pending.rows()) if pending else None)
        if len(samplers) != len(logits):
            logits = self._record_prompt_logprobs(plan, logit_rows, logits)
        # The tokens' copy to the host is queued right behind the step, before the next one.
        launched = InFlightStep.launched(samplers, logits.argmax(dim=-1)) if pipelined else None
        outputs = self._resolve(pending) if pending else []
        self.scheduler.update_after_step(plan)
        self.counters.steps += 1
        if not samplers:
            return outputs
        if pipelined:
            for seq in samplers:
                if self._choice_running(seq) is not None:
                    seq.token_ids.append(PLACEHOLDER)
            self._in_flight = launched
            return outputs
        # Sequences that stopped on the previous step's tokens sample nothing more.
        live = [row for row, seq in enumerate(samplers) if self._choice_running(seq) is not None]
        if len(live) != len(samplers):
            samplers, logits = [samplers[row] for row in live], logits[live]
        if not samplers:
            return outputs
        rows = [self._sampling_row(seq) for seq in samplers]
        sampled = sample(logits, rows, self.penalty_state, tuple(self.tokenizer.eos_token_ids))
        self.penalty_state.record([row.penalty_row for row in rows], sampled.token_ids)
        result = sampled.read()
        return outputs + self._accept_all(samplers, result.token_ids, result)

    def _sampling_row(self, seq: Sequence) -> SamplingRow:
        state = self.requests[seq.request_id]
        penalty_row = -1
        if has_penalty(state.params):
            penalty_row = self.penalty_state.row(seq.seq_id, seq.prompt_token_ids, seq.output_token_ids)
        return SamplingRow(state.params, state.choices[seq.choice_index].seed,
                           seq.num_tokens - seq.num_prompt_tokens, penalty_row)

    def _can_pipeline(self, plan: SchedulerOutput, samplers: list[Sequence]) -> bool:
        if not (self.async_scheduling and samplers):
            return False
        if any(item.seq.wants_prompt_logprobs or item.seq.context_policy.bounded for item in plan.scheduled):
            return False
        return all(is_plain_argmax(self.requests[seq.request_id].params) for seq in samplers)

    def _choice_running(self, seq: Sequence) -> ChoiceState | None:
        """The sequence's choice, unless its request is gone or the choice has finished."""
        state = self.requests.get(seq.request_id)
        if state is None:
            return None
        choice = state.choices[seq.choice_index]
        # (A request id may be reused once its request is gone: the choice must be this seq's.)
        return choice if choice.seq is seq and choice.finish_reason is None else None

    def _resolve(self, step: InFlightStep) -> list[RequestOutput]:
        """Read an in-flight step's tokens and put them in place of its placeholders."""
        tokens = step.read()
        live, live_tokens = [], []
        for seq, token in zip(step.samplers, tokens):
            if self._choice_running(seq) is not None:
                placeholder = seq.token_ids.pop()
                assert placeholder == PLACEHOLDER, "an in-flight token was not the sequence's last"
                live.append(seq)
                live_tokens.append(token)
        return self._accept_all(live, live_tokens, None)

    def _accept_all(self, samplers: list[Sequence], token_ids: list[int], result) -> list[RequestOutput]:
        """Append each sequence's new token, check stops, and make the touched requests' outputs."""
        now = time.monotonic()
        touched: dict[str, RequestState] = {}
        for row, seq in enumerate(samplers):
            state = self.requests[seq.request_id]
            self._accept_token(state, state.choices[seq.choice_index], token_ids[row], result, row)
            if state.metrics.first_token_time is None:
                state.metrics.first_token_time = now
            state.metrics.last_token_time = now
            touched[state.request_id] = state
        self.counters.generation_tokens += len(samplers)
        outputs = []
        for state in touched.values():
            if state.finished:
                state.metrics.finished_time = now
                del self.requests[state.request_id]
            outputs.append(state.make_output())
        return outputs

    def _record_prompt_logprobs(self, plan, logit_rows: list[int], logits: torch.Tensor) -> torch.Tensor:
        """Keep the logprobs of prompt tokens for the sequences that asked; return the rows to
        sample from (the last row of each sampling sequence)."""
        sample_rows, start = [], 0
        for item, rows in zip(plan.scheduled, logit_rows):
            seq = item.seq
            if seq.wants_prompt_logprobs and seq.num_computed_tokens < seq.num_prompt_tokens:
                recorded = self.requests[seq.request_id].prompt_logprobs
                first = seq.num_computed_tokens  # token index of the chunk's first row
                targets = seq.token_ids[first + 1 : min(first + rows, seq.num_prompt_tokens - 1) + 1]
                if targets and len(recorded) == first + 1:  # not again after a preemption
                    values = logits[start : start + len(targets)].log_softmax(-1)
                    ids = torch.tensor(targets, device=logits.device)
                    recorded.extend(values.gather(1, ids[:, None])[:, 0].tolist())
            if item.samples:
                sample_rows.append(start + rows - 1)
            start += rows
        return logits[sample_rows]

    def _accept_token(self, state: RequestState, choice: ChoiceState, token: int, result, row: int) -> None:
        params, seq = state.params, choice.seq
        seq.token_ids.append(token)
        if choice.logprobs is not None:
            text = self.tokenizer.token_to_text
            top = [(t, text(t), lp) for t, lp in zip(result.top_token_ids[row][: params.logprobs],
                                                      result.top_logprobs[row][: params.logprobs])]
            choice.logprobs.append(TokenLogprob(token, text(token), result.logprobs[row], top))
            choice.cumulative_logprob += result.logprobs[row]
        if not params.ignore_eos and token in self.tokenizer.eos_token_ids:
            choice.finish_reason = "stop"
        elif token in params.stop_token_ids:
            choice.finish_reason, choice.stop_reason = "stop", token
        elif params.detokenize:
            choice.detokenizer.append(token)
            if choice.detokenizer.stop_reason is not None:
                choice.finish_reason, choice.stop_reason = "stop", choice.detokenizer.stop_reason
        if choice.finish_reason is None and seq.num_tokens >= seq.max_total_tokens:
            choice.finish_reason = "length"
        if choice.finish_reason is not None:
            self.scheduler.finish(seq, retain=True)
            self.penalty_state.release(seq.seq_id)

    # ----- introspection for metrics and tests -----

    @property
    def num_running(self) -> int:
        return len(self.scheduler.running)

    @property
    def num_waiting(self) -> int:
        return self.scheduler.num_waiting
