"""The engine core: requests in, one scheduler step and one model step at a time, deltas out.

It owns the scheduler, the KV blocks, the model runner and the output processor. Requests
arrive parsed and checked (`EngineRequest`, made by the InputProcessor at the edge); what leaves
is plain data (`RequestDelta`, `StatsSnapshot`), so the same core serves in-process (offline
`LLM`, tests) and in a process of its own behind ZeroMQ (`ropeway serve`).
"""

import itertools
import logging
import random
import time
from dataclasses import asdict, dataclass

import torch

from ropeway import fault_injection
from ropeway.arith import cdiv
from ropeway.config import EngineConfig
from ropeway.kernels import is_long_chunk, warm_up_long_chunk_attention
from ropeway.models import LlamaModel, RopewayTokenizer, effective_base, load_model_files
from ropeway.outputs import RequestMetrics
from ropeway.sampling_params import InvalidParameter
from ropeway.scheduler import (BlockManager, ContextPolicy, RopePlanner, RopeScaling, Scheduler, SchedulerConfig,
                               SchedulerOutput, Sequence)

from .detokenizer import IncrementalDetokenizer
from .kv_pool import allocate_kv_cache, plan_kv_pool
from .limits import ContextLimits
from .faults import is_device_fault, request_failure
from .messages import EngineInfo, EngineRequest, RequestDelta, RequestFailure, TokenizerSpec
from .model_runner import ModelRunner
from .output_processor import OutputProcessor
from .request_state import ChoiceState, RequestState
from .sampler import SamplingRow, is_plain_argmax, sample
from .stats import PlanChoice, StatsSnapshot

log = logging.getLogger("ropeway")

_SEED_MASK = (1 << 63) - 1
_GOLDEN = 0x9E3779B97F4A7C15

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


def _parse_server_setting(parse, raw, flag: str):
    """A server flag's setting; a bad one stops start-up with the flag named."""
    try:
        return parse(raw, flag)
    except InvalidParameter as error:
        raise ValueError(f"{error.param}: {error}") from error


class EngineCore:
    def __init__(self, config: EngineConfig, loaded: LoadedModel | None = None):
        self.config = config
        loaded = loaded or load_model(config)
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.model_config = model_config = self.model.config
        self.device = self.model.device
        self.dtype = self.model.dtype
        self.pool = plan_kv_pool(self.model, self.dtype, self.device, config.block_size,
                                 config.kv_cache_memory_bytes, config.gpu_memory_utilization)
        model_scaling = _parse_server_setting(RopeScaling.from_dict, model_config.rope_scaling or None,
                                              "model rope_scaling")
        self.rope_scaling = (model_scaling if config.rope_scaling is None else
                             _parse_server_setting(RopeScaling.from_dict, config.rope_scaling, "--rope-scaling"))
        self.context_policy = _parse_server_setting(ContextPolicy.from_dict, config.context_policy,
                                                    "--context-policy")
        trained = model_config.max_position_embeddings
        wanted_len = config.max_model_len or self.rope_scaling.context_limit(trained)
        # One sequence must always fit in the pool on its own, or preemption could not help it.
        self.max_model_len = min(wanted_len, self.pool.num_tokens)
        if self.max_model_len < wanted_len:
            log.warning("max_model_len lowered from %d to %d tokens: the KV pool holds no more",
                        wanted_len, self.max_model_len)
        if config.max_model_len and config.max_model_len > self.rope_scaling.context_limit(trained):
            log.warning("--max-model-len %d exceeds the model's trained context (%d tokens) under %s RoPE: "
                        "quality degrades past it; give --rope-scaling (e.g. '{\"rope_type\": \"dynamic\", "
                        "\"factor\": %d}') or a bounded --context-policy", config.max_model_len, trained,
                        self.rope_scaling.rope_type, cdiv(config.max_model_len, trained))
        self.limits = ContextLimits(self.max_model_len, config.max_model_len is not None, trained,
                                    self.pool.num_tokens, config.block_size, self.context_policy, self.rope_scaling)
        self.kv_cache = allocate_kv_cache(self.model, self.pool, self.dtype, self.device)
        self.block_manager = BlockManager(self.pool.num_blocks, config.block_size, config.enable_prefix_caching)
        budget = config.max_num_batched_tokens
        self.planner = RopePlanner(model_config.rope_theta, model_config.head_dim, trained, self.rope_scaling)
        self.scheduler = Scheduler(
            SchedulerConfig(max_num_seqs=config.max_num_seqs, max_num_batched_tokens=budget,
                            prefill_chunk_size=min(config.prefill_chunk_size or budget, budget)),
            self.block_manager, self.planner,
            session_store_blocks=int(self.pool.num_blocks * config.session_store_fraction),
        )
        self.runner = ModelRunner(self.model, self.kv_cache, config.block_size, config.retrieval_archive_bytes)
        if is_long_chunk(self.scheduler.config.prefill_chunk_size):
            # Chunks this long can reach cuDNN: load it now, not inside a first long prompt.
            warm_up_long_chunk_attention(self.device, self.dtype, self.model.num_local_heads,
                                         self.model.num_local_kv_heads, model_config.head_dim)
        self.default_rope_plan = self.planner.model_plan
        self.outputs = OutputProcessor(self.tokenizer)
        self.stats_totals = StatsSnapshot()
        self.failures: list[RequestFailure] = []  # requests failed since the loop last took them
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

    @property
    def requests(self) -> dict[str, RequestState]:
        return self.outputs.requests

    def info(self, served_model_name: str | None = None) -> EngineInfo:
        tok = self.tokenizer
        template = tok.chat_template.source if tok.chat_template is not None else None
        return EngineInfo(
            model_name=served_model_name or self.model_config.name, architecture=self.model_config.architecture,
            device=str(self.device), dtype=str(self.dtype).removeprefix("torch."),
            vocab_size=self.model_config.vocab_size, trained_context=self.model_config.max_position_embeddings,
            max_model_len=self.max_model_len, max_model_len_is_explicit=self.config.max_model_len is not None,
            pool_tokens=self.pool.num_tokens, block_size=self.config.block_size, num_blocks=self.pool.num_blocks,
            bytes_per_block=self.pool.bytes_per_block, max_num_seqs=self.config.max_num_seqs,
            tensor_parallel_size=1, default_context_policy=asdict(self.context_policy),
            default_rope_scaling=asdict(self.rope_scaling),
            tokenizer=TokenizerSpec(tok.tokenizer.to_str(), tok.bos_token_id, tok.eos_token_ids, tok.add_bos,
                                    template))

    def capture_decode_graphs(self) -> None:
        """On CUDA, capture the decode graphs of every batch size the server may run now,
        at start-up, instead of on a batch size's first use mid-stream."""
        if self.runner.decode_graphs is None:
            return
        started = time.perf_counter()
        count = self.runner.decode_graphs.capture_up_to(self.config.max_num_seqs)
        log.info("captured %d decode CUDA graphs in %.1f s", count, time.perf_counter() - started)

    # ----- requests -----

    def add_request(self, request: EngineRequest) -> None:
        """Queue a request; raises InvalidParameter (naming the field) for one it cannot serve."""
        if request.request_id in self.requests:
            raise InvalidParameter("request_id", f"request id {request.request_id!r} is already in use")
        if fault_injection.is_armed():
            fault_injection.note_prompt(request.request_id,
                                        request.prompt or self.tokenizer.decode(request.prompt_token_ids))
            fault_injection.check("admit", request.request_id)
        params, context, token_ids = request.params, request.context, request.prompt_token_ids
        vocab = self.model_config.vocab_size
        if any(not 0 <= t < vocab for t in token_ids):
            raise InvalidParameter("prompt", f"token ids must be integers in [0, {vocab})")
        self.limits.check(len(token_ids), params.max_tokens, context)
        max_total, planned = self.limits.sequence_lengths(len(token_ids), params.max_tokens, context)
        policy = self.limits.policy(context)
        arrival = next(self._arrivals)
        choices = []
        for index in range(params.n):
            seq = Sequence(seq_id=next(self._seq_ids), request_id=request.request_id, choice_index=index,
                           prompt_token_ids=token_ids, rope_plan=None, arrival=arrival,
                           max_total_tokens=max_total, planned_length=planned, rope_scaling=context.rope_scaling,
                           context_policy=policy, wants_prompt_logprobs=params.prompt_logprobs and index == 0)
            choices.append(ChoiceState(
                seq=seq,
                detokenizer=IncrementalDetokenizer(self.tokenizer, token_ids, params.stop,
                                                   params.include_stop_str_in_output, params.skip_special_tokens),
                seed=self._choice_seed(params.seed, index),
                logprobs=[] if params.logprobs is not None else None,
            ))
        self.requests[request.request_id] = RequestState(
            request.request_id, params, choices, RequestMetrics(arrival_time=request.arrival_time),
            prompt_logprobs=[None] if params.prompt_logprobs else None)
        self.scheduler.add([c.seq for c in choices])
        self.stats_totals.prompt_tokens += len(token_ids)

    def _choice_seed(self, seed: int | None, index: int) -> int:
        if seed is None:
            return self._seed_source.getrandbits(63)
        return (seed + index * _GOLDEN) & _SEED_MASK

    def abort_request(self, request_id: str) -> RequestDelta | None:
        """Stop a request and free its blocks now; returns its last delta (finish_reason 'abort')."""
        state = self.requests.pop(request_id, None)
        if state is None:
            return None
        for choice in state.choices:
            if choice.finish_reason is None:
                choice.finish_reason = "abort"
                self.scheduler.finish(choice.seq)
                if choice.seq.token_ids and choice.seq.token_ids[-1] == PLACEHOLDER:
                    choice.seq.token_ids.pop()  # its step is in flight: the token is dropped
        return state.make_delta()

    def fail_request(self, request_id: str, error: Exception, stage: str) -> None:
        """A fault tied to one request ends that request alone: its blocks are freed and the API
        side hears why (400 for a value the request gave, 500 otherwise); the engine goes on."""
        if not isinstance(error, InvalidParameter):
            log.error("request %s failed while %s", request_id, stage, exc_info=error)
        self.abort_request(request_id)
        self.stats_totals.request_failures += 1
        self.failures.append(request_failure(request_id, error, stage))

    def take_failures(self) -> list[RequestFailure]:
        failures, self.failures = self.failures, []
        return failures

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    # ----- one step -----

    def step(self) -> list[RequestDelta]:
        """Run one batch; return a delta for every request that progressed.

        With asynchronous scheduling, a step whose sequences all sample greedily (no
        logprobs, penalties, prompt logprobs or bounded caches) leaves its tokens on the
        device: each sampling sequence gets a PLACEHOLDER token, the next step is scheduled
        and launched with those inputs taken from the device, and only then are the tokens
        read (the GPU already busy with the next step) and checked for stops. Outputs thus
        come one step later; a sequence that stopped has computed one token too many, which
        is dropped."""
        plan = self.scheduler.schedule()
        if plan.failed:
            self._fail_scheduled(plan)
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
        for item in plan.scheduled:  # a fault here (or in execute) leaves the device state unknown
            fault_injection.check("execute", item.seq.request_id)
        logits = self.runner.execute(plan, logit_rows, (pending.tokens, pending.rows()) if pending else None)
        if len(samplers) != len(logits):
            logits = self._record_prompt_logprobs(plan, logit_rows, logits)
        # The tokens' copy to the host is queued right behind the step, before the next one.
        launched = InFlightStep.launched(samplers, logits.argmax(dim=-1)) if pipelined else None
        outputs = self._resolve(pending) if pending else []
        self.scheduler.update_after_step(plan)
        self.stats_totals.steps += 1
        if not samplers:
            return outputs
        if pipelined:
            for seq in samplers:
                if self.outputs.choice(seq) is not None:
                    seq.token_ids.append(PLACEHOLDER)
            self._in_flight = launched
            return outputs
        # Sequences that stopped on the previous step's tokens sample nothing more.
        live = [row for row, seq in enumerate(samplers) if self.outputs.choice(seq) is not None]
        if len(live) != len(samplers):
            samplers, logits = [samplers[row] for row in live], logits[live]
        if not samplers:
            return outputs
        states = [self.requests[seq.request_id] for seq in samplers]
        rows = [SamplingRow(state.params, state.choices[seq.choice_index].seed, seq.prompt_token_ids, seq.token_ids)
                for seq, state in zip(samplers, states)]
        samplers, result = self._sample(logits, samplers, rows)
        return outputs + self._accept_all(samplers, result.token_ids, result) if samplers else outputs

    def _fail_scheduled(self, plan: SchedulerOutput) -> None:
        """Fail the requests whose scheduling raised, and take their other choices out of the plan."""
        for seq, error in plan.failed:
            self.fail_request(seq.request_id, error, "scheduling")
        failed = {seq.request_id for seq, _ in plan.failed}
        for items in (plan.scheduled, plan.rope_growths, plan.evictions):
            items[:] = [item for item in items if item.seq.request_id not in failed]

    def _sample(self, logits: torch.Tensor, samplers: list[Sequence], rows: list[SamplingRow]):
        """Sample the batch; if that raises, find the rows at fault by sampling each alone (a row's
        draw does not depend on its batch), fail their requests and sample the rest together."""
        try:
            for seq in samplers:
                fault_injection.check("sample", seq.request_id)
            return samplers, sample(logits, rows)
        except Exception as error:
            if is_device_fault(error):
                raise
        for row, seq in enumerate(samplers):
            try:
                fault_injection.check("sample", seq.request_id)
                sample(logits[row : row + 1], rows[row : row + 1])
            except Exception as error:
                if is_device_fault(error):
                    raise
                self.fail_request(seq.request_id, error, "sampling")
        live = [row for row, seq in enumerate(samplers) if self.outputs.choice(seq) is not None]
        if not live:
            return [], None
        return [samplers[row] for row in live], sample(logits[live], [rows[row] for row in live])

    def _can_pipeline(self, plan: SchedulerOutput, samplers: list[Sequence]) -> bool:
        if not (self.async_scheduling and samplers):
            return False
        if any(item.seq.wants_prompt_logprobs or item.seq.context_policy.bounded for item in plan.scheduled):
            return False
        return all(is_plain_argmax(self.requests[seq.request_id].params) for seq in samplers)

    def _resolve(self, step: InFlightStep) -> list[RequestDelta]:
        """Read an in-flight step's tokens and put them in place of its placeholders."""
        tokens = step.read()
        live, live_tokens = [], []
        for seq, token in zip(step.samplers, tokens):
            if self.outputs.choice(seq) is not None:
                placeholder = seq.token_ids.pop()
                assert placeholder == PLACEHOLDER, "an in-flight token was not the sequence's last"
                live.append(seq)
                live_tokens.append(token)
        return self._accept_all(live, live_tokens, None)

    def _accept_all(self, samplers: list[Sequence], token_ids: list[int], result) -> list[RequestDelta]:
        """Append each sequence's new token, check stops, and make the touched requests' deltas."""
        now = time.monotonic()
        touched: dict[str, RequestState] = {}
        for row, seq in enumerate(samplers):
            state = self.requests.get(seq.request_id)
            if state is None:
                continue  # another of its choices failed in this loop
            try:
                fault_injection.check("report", seq.request_id)
                if self.outputs.accept(state, state.choices[seq.choice_index], token_ids[row], result, row):
                    self.scheduler.finish(seq, retain=True)
            except Exception as error:
                self.fail_request(seq.request_id, error, "reporting")
                touched.pop(seq.request_id, None)
                continue
            if state.metrics.first_token_time is None:
                state.metrics.first_token_time = now
            state.metrics.last_token_time = now
            touched[state.request_id] = state
        self.stats_totals.generation_tokens += len(samplers)
        deltas = []
        for state in touched.values():
            if state.finished:
                state.metrics.finished_time = now
            try:
                delta = state.make_delta()
            except Exception as error:
                self.fail_request(state.request_id, error, "reporting")
                continue
            if state.finished:
                del self.requests[state.request_id]
            deltas.append(delta)
        return deltas

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

    # ----- stats -----

    def stats(self) -> StatsSnapshot:
        """The state after the last step, and the totals since start-up, as data."""
        totals, scheduler, bm, ops = self.stats_totals, self.scheduler, self.block_manager, self.runner.cache_ops
        new_plans = [PlanChoice(effective_base(plan), plan.scaling_factor) for plan in scheduler.new_plans]
        scheduler.new_plans.clear()
        on_cuda = self.device.type == "cuda"
        return StatsSnapshot(
            num_running=len(scheduler.running), num_waiting=scheduler.num_waiting,
            kv_used_blocks=bm.num_used_blocks, session_store_blocks=scheduler.sessions.num_blocks,
            retrieval_archive_bytes=ops.archive_budget.num_bytes,
            gpu_memory_allocated_bytes=torch.cuda.memory_allocated(self.device) if on_cuda else 0,
            gpu_memory_reserved_bytes=torch.cuda.memory_reserved(self.device) if on_cuda else 0,
            prompt_tokens=totals.prompt_tokens, generation_tokens=totals.generation_tokens, steps=totals.steps,
            num_preemptions=scheduler.num_preemptions, prefix_cache_queries=bm.prefix_queries,
            prefix_cache_hits=bm.prefix_hits, rope_plan_growths=scheduler.num_plan_growths,
            kv_evictions=scheduler.num_evictions, kv_evicted_tokens=scheduler.num_evicted_tokens,
            kv_rerotated_keys=scheduler.num_rerotated_keys,
            landmark_recomputations=scheduler.num_landmark_recomputations,
            session_hits=scheduler.sessions.hits, session_misses=scheduler.sessions.misses,
            retrieval_recalls=ops.num_recalls, retrieval_recalled_blocks=ops.num_recalled_blocks,
            request_failures=totals.request_failures, new_plans=new_plans)

    @property
    def num_running(self) -> int:
        return len(self.scheduler.running)

    @property
    def num_waiting(self) -> int:
        return self.scheduler.num_waiting
