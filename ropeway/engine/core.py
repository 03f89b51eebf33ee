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
from ropeway.kernels import is_long_chunk, warm_up_long_chunk_attention, warm_up_sampling
from ropeway.kernels.fp8_kv import FP8
from ropeway.models import (ForwardStopped, LlamaModel, RopewayTokenizer, TensorParallel, effective_base,
                            load_model_files)
from ropeway.outputs import RequestMetrics
from ropeway.sampling_params import InvalidParameter
from ropeway.scheduler import (BlockManager, ContextPolicy, HostTier, RopePlanner, RopeScaling, Scheduler,
                               SchedulerConfig, SchedulerOutput, Sequence)

from .detokenizer import IncrementalDetokenizer
from .kv_pool import allocate_kv_cache, plan_kv_pool
from .limits import ContextLimits
from .faults import is_device_fault, request_failure
from .grammar import GrammarTokenizer
from .grammar_masks import GrammarMasks
from .messages import EngineInfo, EngineRequest, RequestDelta, RequestFailure, TokenizerSpec
from .model_runner import ModelRunner
from .output_processor import OutputProcessor
from .request_state import ChoiceState, RequestState
from .sampler import PENALTY, RowSettings, SampledTokens, SamplerOutput, SamplingRow, sample
from .sampler_graphs import SamplerGraphs
from .sampling_state import PenaltyState
from .stats import PlanChoice, StatsSnapshot
from .step_interrupt import StepInterrupt
from .workers import CaptureGraphs, WorkerGroup, rank_device

log = logging.getLogger("ropeway")

_SEED_MASK = (1 << 63) - 1
_GOLDEN = 0x9E3779B97F4A7C15

# In a sequence's token ids: the token a launched step samples on the device, not read yet.
PLACEHOLDER = -1


def _to_host(tensor: torch.Tensor) -> torch.Tensor:
    """A host copy queued behind the work that makes the tensor (pinned, asynchronous on CUDA)."""
    if not tensor.is_cuda:
        return tensor
    return torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True).copy_(tensor, non_blocking=True)


@dataclass
class PromptLogprobChunk:
    """One chunk's prompt logprobs, on their way to the host."""
    state: RequestState
    first: int                      # token index of the chunk's first row
    values: torch.Tensor            # [n] the logprobs of the chunk's next prompt tokens
    top_values: torch.Tensor | None = None
    top_ids: torch.Tensor | None = None

    def record(self) -> None:
        recorded = self.state.prompt_logprobs
        if len(recorded) != self.first + 1:  # not again after a preemption recomputed the chunk
            return
        recorded.extend(self.values.tolist())
        if self.top_ids is not None:
            self.state.prompt_top_logprobs.extend(
                list(zip(i, v)) for i, v in zip(self.top_ids.tolist(), self.top_values.tolist()))


@dataclass
class InFlightStep:
    """A launched step whose results are still on the device: its sampled tokens (and logprobs)
    and its prompt logprobs. Their copies to the host are queued right behind the step."""
    samplers: list[Sequence]
    sampled: SampledTokens | None
    prompt_chunks: list[PromptLogprobChunk]
    copied: torch.cuda.Event | None = None

    @classmethod
    def launched(cls, samplers: list[Sequence], sampled: SampledTokens | None,
                 prompt_chunks: list[PromptLogprobChunk]) -> "InFlightStep":
        copied = None
        if prompt_chunks and prompt_chunks[0].values.is_cuda:
            for chunk in prompt_chunks:
                chunk.values = _to_host(chunk.values)
                if chunk.top_ids is not None:
                    chunk.top_values, chunk.top_ids = _to_host(chunk.top_values), _to_host(chunk.top_ids)
            copied = torch.cuda.Event()
            copied.record()
        return cls(samplers, sampled, prompt_chunks, copied)

    @property
    def tokens(self) -> torch.Tensor:
        return self.sampled.token_ids

    def rows(self) -> dict[int, int]:
        return {seq.seq_id: row for row, seq in enumerate(self.samplers)}

    def read(self) -> SamplerOutput | None:
        """Wait for the host copies; record the prompt logprobs; the sampled tokens as lists."""
        if self.copied is not None:
            self.copied.synchronize()
        for chunk in self.prompt_chunks:
            chunk.record()
        return self.sampled.read() if self.sampled is not None else None


@dataclass
class LoadedModel:
    """Weights on the device and the tokenizer: what several engines can share (tests do)."""
    model: LlamaModel
    tokenizer: RopewayTokenizer
    seconds: float


def load_model(config: EngineConfig, tp: TensorParallel | None = None) -> LoadedModel:
    """The model (this rank's shard under tensor parallelism) and the tokenizer."""
    started = time.perf_counter()
    device = rank_device(config, tp.rank if tp else 0)
    model_config, weights, tokenizer = load_model_files(config.model, config.torch_dtype(device))
    model = LlamaModel(model_config, weights, device, tp)
    model.pack_linear_weights_for_cpu()
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
        # Under tensor parallelism the other ranks start first: loading the model joins their group.
        self.workers = WorkerGroup(config) if config.tensor_parallel_size > 1 else None
        loaded = loaded or load_model(config, self.workers.tp if self.workers else None)
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.model_config = model_config = self.model.config
        self.device = self.model.device
        self.dtype = self.model.dtype
        self.kv_dtype = config.kv_torch_dtype(self.dtype)
        self.pool = plan_kv_pool(self.model, self.kv_dtype, self.device, config.block_size,
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
                                    self.pool.num_tokens, config.block_size, self.context_policy, self.rope_scaling,
                                    config.tensor_parallel_size)
        self.kv_cache = allocate_kv_cache(self.model, self.pool, self.kv_dtype, self.device)
        if self.workers is not None:
            if self.context_policy.type == "landmark":
                raise ValueError("--context-policy landmark is not supported with --tensor-parallel-size > 1")
            self.workers.init_cache(self.pool)
        # A host slot holds a block of every cache tensor, its landmark slot bias (fp32) included.
        host_slot_bytes = self.pool.bytes_per_block + config.block_size * 4
        host_slots = config.kv_host_bytes(self.device) // host_slot_bytes
        self.host_tier = HostTier(host_slots) if host_slots else None
        self.block_manager = BlockManager(self.pool.num_blocks, config.block_size, config.enable_prefix_caching,
                                          self.host_tier)
        budget = config.max_num_batched_tokens
        self.planner = RopePlanner(model_config.rope_theta, model_config.head_dim, trained, self.rope_scaling)
        self.scheduler = Scheduler(
            SchedulerConfig(max_num_seqs=config.max_num_seqs, max_num_batched_tokens=budget,
                            prefill_chunk_size=min(config.prefill_chunk_size or budget, budget),
                            max_prefill_tokens_with_decodes=config.max_prefill_tokens_with_decodes
                            or max(budget // 2, 1), host_blocks_per_step=config.kv_host_blocks_per_step),
            self.block_manager, self.planner,
            session_store_blocks=int(self.pool.num_blocks * config.session_store_fraction),
        )
        self.runner = ModelRunner(self.model, self.kv_cache, config.block_size, config.retrieval_archive_bytes,
                                  host_slots)
        self.runner.workers = self.workers
        self.penalty_state = PenaltyState(model_config.vocab_size, self.device)
        self.sampler_graphs = (SamplerGraphs(self.runner.decode_graphs)
                               if config.sampler_cuda_graphs and self.runner.decode_graphs is not None else None)
        self.eos_token_ids = tuple(self.tokenizer.eos_token_ids)
        self.grammar_tokenizer = GrammarTokenizer(self.tokenizer.tokenizer.to_str(), model_config.vocab_size,
                                                  self.tokenizer.eos_token_ids)
        self.grammar_masks = GrammarMasks(self.grammar_tokenizer)
        if is_long_chunk(self.scheduler.config.prefill_chunk_size):
            # Chunks this long can reach cuDNN: load it now, not inside a first long prompt.
            warm_up_long_chunk_attention(self.device, self.dtype, self.model.num_local_heads,
                                         self.model.num_local_kv_heads, model_config.head_dim)
        # A ramping batch of sampled rows must not wait on Triton compiles (seconds each on the H200).
        warm_up_sampling(model_config.vocab_size, config.max_num_seqs, self.device)
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
        log.info("KV pool: %d blocks of %d tokens = %d tokens, %.1f MiB in %s; max_model_len %d",
                 self.pool.num_blocks, self.pool.block_size, self.pool.num_tokens,
                 self.pool.num_bytes / 2**20, self.kv_cache_dtype_name, self.max_model_len)
        if self.host_tier is not None:
            log.info("KV host tier: %d blocks, %.1f MiB", host_slots, host_slots * host_slot_bytes / 2**20)

    def shutdown(self) -> None:
        """Stop the tensor-parallel workers (nothing to do on one rank)."""
        if self.workers is not None:
            self.workers.shutdown()
            self.workers = None

    @property
    def kv_cache_dtype_name(self) -> str:
        """bfloat16, float32, ... or fp8_e4m3 (scales per token and KV head)."""
        return "fp8_e4m3" if self.kv_dtype == FP8 else str(self.kv_dtype).removeprefix("torch.")

    @property
    def requests(self) -> dict[str, RequestState]:
        return self.outputs.requests

    def info(self, served_model_name: str | None = None) -> EngineInfo:
        tok, transfers = self.tokenizer, self.runner.block_transfers
        template = tok.chat_template.source if tok.chat_template is not None else None
        return EngineInfo(
            model_name=served_model_name or self.model_config.name, architecture=self.model_config.architecture,
            device=str(self.device), dtype=str(self.dtype).removeprefix("torch."),
            vocab_size=self.model_config.vocab_size, trained_context=self.model_config.max_position_embeddings,
            max_model_len=self.max_model_len, max_model_len_is_explicit=self.config.max_model_len is not None,
            pool_tokens=self.pool.num_tokens, block_size=self.config.block_size, num_blocks=self.pool.num_blocks,
            kv_cache_dtype=self.kv_cache_dtype_name,
            bytes_per_block=self.pool.bytes_per_block, max_num_seqs=self.config.max_num_seqs,
            tensor_parallel_size=self.config.tensor_parallel_size, default_context_policy=asdict(self.context_policy),
            default_rope_scaling=asdict(self.rope_scaling),
            tokenizer=TokenizerSpec(tok.tokenizer.to_str(), tok.bos_token_id, tok.eos_token_ids, tok.add_bos,
                                    template),
            kv_host_tier_bytes=transfers.bytes_per_slot * self.host_tier.num_slots if transfers else 0)

    def capture_decode_graphs(self) -> None:
        """On CUDA, capture the decode graphs of every batch size the server may run now,
        at start-up, instead of on a batch size's first use mid-stream."""
        if self.runner.decode_graphs is None:
            return
        started = time.perf_counter()
        if self.workers is not None:  # the graphs hold collectives: every rank captures alongside
            self.workers.send(CaptureGraphs(self.config.max_num_seqs))
        count = self.runner.decode_graphs.capture_up_to(self.config.max_num_seqs)
        log.info("captured %d decode CUDA graphs in %.1f s", count, time.perf_counter() - started)
        if self.sampler_graphs is not None:
            started = time.perf_counter()
            count = self.sampler_graphs.capture_common()
            log.info("captured %d sampler CUDA graphs in %.1f s", count, time.perf_counter() - started)

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
        if params.logit_bias and max(params.logit_bias) >= vocab:
            raise InvalidParameter("logit_bias", f"logit_bias keys must be token ids in [0, {vocab})")
        self.grammar_tokenizer.check(params)
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
        wants_top = params.prompt_logprobs and params.prompt_top_logprobs > 0
        self.requests[request.request_id] = RequestState(
            request.request_id, params, choices, RequestMetrics(arrival_time=request.arrival_time),
            RowSettings(params), prompt_logprobs=[None] if params.prompt_logprobs else None,
            prompt_top_logprobs=[[]] if wants_top else None)
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
                self._release(choice.seq.seq_id)
                if choice.seq.token_ids and choice.seq.token_ids[-1] == PLACEHOLDER:
                    choice.seq.token_ids.pop()  # its step is in flight: the token is dropped
        return state.make_delta()

    def _release(self, seq_id: int) -> None:
        """A finished or aborted sequence's sampling state: its penalty counts and grammar matcher."""
        self.penalty_state.release(seq_id)
        self.grammar_masks.release(seq_id)

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

    def step(self, interrupt: StepInterrupt | None = None) -> list[RequestDelta]:
        """Run one batch; return a delta for every request that progressed. interrupt: if it says
        so between two layers (the engine is stopping, or every request in the batch was aborted
        meanwhile), the batch is dropped as though never scheduled: nothing of it is booked.

        The step's results stay on the device (the sampler makes no host synchronization), their
        copies to the host queued behind it. With asynchronous scheduling (on CUDA), each
        sampling sequence then gets a PLACEHOLDER token and step() returns: the next call
        schedules and launches the next step, its inputs taken from the device, before it reads
        this step's tokens (the GPU already busy) and checks them for stops. Outputs thus come
        one step later, whatever the requests ask for (sampling, penalties, logprobs, prompt
        logprobs, bounded caches); a sequence that stopped has computed one token too many,
        which is dropped. Without it, each step is read at its end."""
        transfers = self.runner.block_transfers
        if transfers is not None:
            self.scheduler.loads_finished(transfers.finished())
        plan = self.scheduler.schedule()
        if plan.failed:
            self._fail_scheduled(plan)
        self.runner.move_blocks(plan)
        pending, self._in_flight = self._in_flight, None
        if plan.is_empty:
            if pending:
                return self._resolve(pending)
            if self.scheduler.loading:  # nothing else to run: wait for blocks coming back
                self.scheduler.loads_finished(transfers.wait_for_a_load())
            return []
        now = time.monotonic()
        for item in plan.scheduled:
            metrics = self.requests[item.seq.request_id].metrics
            if metrics.first_scheduled_time is None:
                metrics.first_scheduled_time = now
        samplers = [item.seq for item in plan.scheduled if item.samples]
        logit_rows = self.runner.logit_rows(plan)
        for item in plan.scheduled:  # a fault here (or in execute) leaves the device state unknown
            fault_injection.check("execute", item.seq.request_id)
        # (A pending step that sampled nothing, e.g. a prefill chunk, or one whose every sampling
        # request failed, left no placeholder to fill.)
        in_flight_tokens = (pending.tokens, pending.rows()) if pending and pending.sampled is not None else None
        keep_going = interrupt.keep_going_for({item.seq.request_id for item in plan.scheduled}) if interrupt else None
        try:
            logits = self.runner.execute(plan, logit_rows, in_flight_tokens, keep_going)
        except ForwardStopped as stopped:
            # Blocks are registered for the prefix cache only once a step is booked, so the
            # half-written ones are never found; the aborts, applied next, free them.
            log.info("a step of %d tokens was dropped after %d of %d layers: nobody wants it any more",
                     sum(item.num_new_tokens for item in plan.scheduled), stopped.layers_done, stopped.num_layers)
            return self._resolve(pending) if pending else []
        prompt_chunks = []
        if len(samplers) != len(logits):
            logits, prompt_chunks = self._prompt_logprobs(plan, logit_rows, logits)
        outputs = []
        if pending and any(self.requests[seq.request_id].params.structured_outputs for seq in samplers):
            # A grammar's mask needs the in-flight step's tokens: read them now, while the GPU runs
            # this step's forward pass, then fill and upload the masks, then sample.
            outputs, pending = self._resolve(pending), None
            logits, samplers = self._still_requested(logits, samplers)
        sampled, failed = None, {}
        if samplers:
            # (Sequences that stopped on the in-flight step's tokens sample too; their token is dropped.)
            # A request whose sampling raises fails alone; the others' rows are sampled together.
            samplers, sampled, failed = self._sample(logits, samplers)
        launched = InFlightStep.launched(samplers, sampled, prompt_chunks)
        if pending:
            outputs = self._resolve(pending)
        self.scheduler.update_after_step(plan)
        self.stats_totals.steps += 1
        for request_id, error in failed.items():  # once the step is booked, as a fault in reporting
            self.fail_request(request_id, error, "sampling")
        if not self.async_scheduling:
            return outputs + self._resolve(launched)
        for seq in launched.samplers:
            if self.outputs.choice(seq) is not None:
                seq.token_ids.append(PLACEHOLDER)
        self._in_flight = launched
        return outputs

    def _still_requested(self, logits: torch.Tensor, samplers: list[Sequence]
                         ) -> tuple[torch.Tensor, list[Sequence]]:
        """The samplers (and their logits' rows) whose request is still open: reading the in-flight
        step may have finished or failed a request, whose sequences then sample nothing."""
        kept = [row for row, seq in enumerate(samplers) if seq.request_id in self.requests]
        if len(kept) == len(samplers):
            return logits, samplers
        index = torch.tensor(kept, dtype=torch.int64).to(logits.device, non_blocking=True)
        return logits.index_select(0, index), [samplers[row] for row in kept]

    def _fail_scheduled(self, plan: SchedulerOutput) -> None:
        """Fail the requests whose scheduling raised, and take their other choices out of the plan."""
        for seq, error in plan.failed:
            self.fail_request(seq.request_id, error, "scheduling")
        failed = {seq.request_id for seq, _ in plan.failed}
        for items in (plan.scheduled, plan.rope_growths, plan.evictions):
            items[:] = [item for item in items if item.seq.request_id not in failed]

    def _sample(self, logits: torch.Tensor, samplers: list[Sequence]
                ) -> tuple[list[Sequence], SampledTokens | None, dict[str, Exception]]:
        """Sample the batch (tokens left on the device); if that raises, find the rows at fault by
        sampling each alone (a row's draw does not depend on its batch) and sample the rest
        together. Returns the sequences that sampled, in the result's row order, and the requests
        to fail (every choice of a request with a faulty row is left out)."""
        try:
            for seq in samplers:
                fault_injection.check("sample", seq.request_id)
            return samplers, self._sample_rows(logits, samplers, [self._sampling_row(seq) for seq in samplers]), {}
        except Exception as error:
            if is_device_fault(error):
                raise
        failed: dict[str, Exception] = {}
        sampling_rows: dict[int, SamplingRow] = {}
        for row, seq in enumerate(samplers):
            if seq.request_id in failed:
                continue
            try:
                fault_injection.check("sample", seq.request_id)
                sampling_row = self._sampling_row(seq)
                sample(logits[row : row + 1], [sampling_row], self.penalty_state, self.eos_token_ids,
                       self._grammar_mask([seq], [sampling_row], logits.device))
            except Exception as error:
                if is_device_fault(error):
                    raise
                failed[seq.request_id] = error
                continue
            sampling_rows[row] = sampling_row
        live = [row for row in sampling_rows if samplers[row].request_id not in failed]
        if not live:
            return [], None, failed
        index = torch.tensor(live, dtype=torch.int64, device=logits.device)
        live_samplers = [samplers[row] for row in live]
        sampled = self._sample_rows(logits.index_select(0, index), live_samplers, [sampling_rows[row] for row in live])
        return live_samplers, sampled, failed

    def _sample_rows(self, logits: torch.Tensor, seqs: list[Sequence], rows: list[SamplingRow]) -> SampledTokens:
        sampled = sample(logits, rows, self.penalty_state, self.eos_token_ids,
                         self._grammar_mask(seqs, rows, logits.device), self.sampler_graphs)
        self.penalty_state.record([row.penalty_row for row in rows], sampled.token_ids)
        return sampled

    def _grammar_mask(self, seqs: list[Sequence], rows: list[SamplingRow], device: torch.device):
        return self.grammar_masks.mask(seqs, [row.params for row in rows],
                                       lambda seq: self.outputs.choice(seq) is not None, device)

    def _sampling_row(self, seq: Sequence) -> SamplingRow:
        state = self.requests[seq.request_id]
        penalty_row = -1
        if state.sampling.flags & PENALTY:
            penalty_row = self.penalty_state.row(seq.seq_id, seq.prompt_token_ids, seq.output_token_ids)
        # The stream's counter: output tokens so far, an in-flight placeholder included.
        return SamplingRow(state.params, state.choices[seq.choice_index].seed,
                           seq.num_tokens - seq.num_prompt_tokens, penalty_row, state.sampling)

    def _resolve(self, step: InFlightStep) -> list[RequestDelta]:
        """Read a launched step's results; its tokens replace their placeholders."""
        result = step.read()
        if result is None:
            return []
        live, live_tokens, live_rows = [], [], []
        for row, (seq, token) in enumerate(zip(step.samplers, result.token_ids)):
            if self.outputs.choice(seq) is not None:
                if seq.token_ids and seq.token_ids[-1] == PLACEHOLDER:
                    seq.token_ids.pop()
                live.append(seq)
                live_tokens.append(token)
                live_rows.append(row)
        return self._accept_all(live, live_tokens, result, live_rows)

    def _accept_all(self, samplers: list[Sequence], token_ids: list[int], result: SamplerOutput,
                    result_rows: list[int]) -> list[RequestDelta]:
        """Append each sequence's new token, check stops, and make the touched requests' deltas.
        result_rows: each sequence's row in result (its logprobs)."""
        now = time.monotonic()
        touched: dict[str, RequestState] = {}
        for seq, token, row in zip(samplers, token_ids, result_rows):
            state = self.requests.get(seq.request_id)
            if state is None:
                continue  # another of its choices failed in this loop
            try:
                fault_injection.check("report", seq.request_id)
                if self.outputs.accept(state, state.choices[seq.choice_index], token, result, row):
                    self.scheduler.finish(seq, retain=True)
                    self._release(seq.seq_id)
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

    def _prompt_logprobs(self, plan, logit_rows: list[int], logits: torch.Tensor
                         ) -> tuple[torch.Tensor, list[PromptLogprobChunk]]:
        """The logprobs of the prompt tokens of the sequences that asked, still on the device; and
        the rows to sample from (the last row of each sampling sequence)."""
        sample_rows, chunks, start = [], [], 0
        for item, rows in zip(plan.scheduled, logit_rows):
            seq = item.seq
            if seq.wants_prompt_logprobs and seq.num_computed_tokens < seq.num_prompt_tokens:
                state = self.requests[seq.request_id]
                first = seq.num_computed_tokens  # token index of the chunk's first row
                targets = seq.token_ids[first + 1 : min(first + rows, seq.num_prompt_tokens - 1) + 1]
                if targets:
                    values = logits[start : start + len(targets)].log_softmax(-1)
                    ids = torch.tensor(targets, dtype=torch.int64).to(logits.device, non_blocking=True)
                    chunk = PromptLogprobChunk(state, first, values.gather(1, ids[:, None])[:, 0])
                    if state.prompt_top_logprobs is not None:
                        chunk.top_values, chunk.top_ids = values.topk(state.params.prompt_top_logprobs, dim=-1)
                    chunks.append(chunk)
            if item.samples:
                sample_rows.append(start + rows - 1)
            start += rows
        index = torch.tensor(sample_rows, dtype=torch.int64).to(logits.device, non_blocking=True)
        return logits.index_select(0, index), chunks

    # ----- stats -----

    def stats(self) -> StatsSnapshot:
        """The state after the last step, and the totals since start-up, as data."""
        totals, scheduler, bm, ops = self.stats_totals, self.scheduler, self.block_manager, self.runner.cache_ops
        transfers = self.runner.block_transfers
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
            kv_host_tier_bytes=self.host_tier.num_used_slots * transfers.bytes_per_slot if transfers else 0,
            kv_host_tier_hits=self.host_tier.hits if self.host_tier else 0,
            kv_host_offloaded_bytes=transfers.offloaded_bytes if transfers else 0,
            kv_host_loaded_bytes=transfers.loaded_bytes if transfers else 0,
            retrieval_recalls=ops.num_recalls, retrieval_recalled_blocks=ops.num_recalled_blocks,
            retrieval_archive_forgotten_blocks=ops.archive_budget.num_forgotten_blocks,
            request_failures=totals.request_failures, new_plans=new_plans)

    @property
    def num_running(self) -> int:
        return len(self.scheduler.running)

    @property
    def num_waiting(self) -> int:
        return self.scheduler.num_waiting
