"""Prometheus metrics, prefixed `ropeway:` and named after vLLM's.

Engine-wide state (queue lengths, KV usage, token and preemption totals) arrives as data: the
engine core's StatsSnapshot after each step, copied into gauges and counters; nothing here
reads or changes the engine's objects. Per-request latencies and
lengths are observed from the request's own stream of outputs.
"""

from collections.abc import AsyncIterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

from ropeway.engine.messages import EngineInfo
from ropeway.engine.stats import StatsSnapshot
from ropeway.outputs import RequestOutput

_LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0,
                    2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
_ITL_BUCKETS = (0.001, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15,
                0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)


def length_buckets(max_len: int) -> list[int]:
    """1, 2, 5, 10, 20, 50, ... up to max_len (inclusive), as vLLM buckets token counts."""
    buckets, scale = [], 1
    while True:
        for mantissa in (1, 2, 5):
            value = mantissa * scale
            if value > max_len:
                return buckets + ([max_len] if not buckets or buckets[-1] < max_len else [])
            buckets.append(value)
        scale *= 10


class ServerMetrics:
    def __init__(self, info: EngineInfo, model_name: str):
        self.registry = registry = CollectorRegistry()
        label = {"model_name": model_name}
        names = ["model_name"]

        def gauge(name, doc):
            return Gauge(f"ropeway:{name}", doc, names, registry=registry).labels(**label)

        def counter(name, doc):
            return Counter(f"ropeway:{name}", doc, names, registry=registry).labels(**label)

        def histogram(name, doc, buckets):
            return Histogram(f"ropeway:{name}", doc, names, buckets=buckets, registry=registry).labels(**label)

        self.num_requests_running = gauge("num_requests_running", "Sequences in the running batch.")
        self.num_requests_waiting = gauge("num_requests_waiting", "Sequences waiting to be scheduled.")
        self.kv_cache_usage = gauge("kv_cache_usage_perc", "Fraction of KV cache blocks in use (0 to 1).")
        self.kv_blocks_used = gauge("kv_cache_used_blocks", "KV cache blocks in use.")
        self.kv_blocks_capacity = gauge("kv_cache_capacity_blocks", "KV cache blocks in the pool.")
        self.kv_bytes_used = gauge("kv_cache_used_bytes", "Bytes of the KV cache pool in use.")
        self.kv_bytes_capacity = gauge("kv_cache_capacity_bytes", "Bytes of the KV cache pool.")
        # What the pool stores, as vLLM's cache_config_info: a constant 1 with the settings as labels.
        Info("ropeway:kv_cache", "KV cache storage: dtype (fp8_e4m3: a scale per token and KV head) and block size.",
             names, registry=registry).labels(**label).info({"kv_cache_dtype": info.kv_cache_dtype,
                                                             "block_size": str(info.block_size)})
        self.on_cuda = info.device.startswith("cuda")
        if self.on_cuda:
            self.gpu_allocated = gauge("gpu_memory_allocated_bytes", "GPU memory held by tensors (torch).")
            self.gpu_reserved = gauge("gpu_memory_reserved_bytes", "GPU memory reserved by torch's allocator.")

        self.prompt_tokens = counter("prompt_tokens", "Prompt tokens of admitted requests.")
        self.generation_tokens = counter("generation_tokens", "Generated tokens.")
        self.num_preemptions = counter("num_preemptions", "Sequences preempted (their KV recomputed later).")
        self.prefix_cache_queries = counter("prefix_cache_queries", "Prompt tokens looked up in the prefix cache.")
        self.prefix_cache_hits = counter("prefix_cache_hits", "Prompt tokens found in the prefix cache.")
        self.request_success = Counter("ropeway:request_success", "Choices (sequences) that ended, by finish reason.",
                                       ["model_name", "finished_reason"], registry=registry)
        self._model_name = model_name
        self.rope_plan_growths = counter("rope_plan_growths",
                                         "RoPE plans grown because a sequence outgrew its planned length.")
        self.rope_plan_base = histogram("rope_plan_base", "Effective RoPE base of each chosen or grown plan "
                                        "(the base a plain RoPE would need for the plan's lowest frequency).",
                                        [10.0 ** (e / 2) for e in range(6, 21)])
        self.rope_plan_factor = histogram("rope_plan_factor", "Context scaling factor of each chosen or grown plan "
                                          "(1 for the model's own RoPE).", (1, 1.25, 1.5, 2, 3, 4, 6, 8, 16, 32, 64))
        self.kv_evictions = counter("kv_evictions", "Evictions from bounded (sink_window, landmark) caches.")
        self.kv_evicted_tokens = counter("kv_evicted_tokens", "Tokens evicted from bounded caches.")
        self.kv_rerotated_keys = counter("kv_rerotated_keys", "Cached token keys re-rotated to new positions or plans.")
        self.landmark_recomputations = counter("landmark_recomputations",
                                               "Evicted chunks re-computed alone and summarized into landmark slots.")
        self.session_hits = counter("session_hits", "Requests that continued from a retained chat session.")
        self.session_misses = counter("session_misses", "Bounded-cache requests that found no retained session.")
        self.session_store_bytes = gauge("session_store_bytes", "KV bytes held by retained chat sessions.")
        self.kv_host_tier_bytes = gauge("kv_host_tier_bytes", "Host memory holding KV blocks the pool let go of.")
        self.kv_host_tier_capacity_bytes = gauge("kv_host_tier_capacity_bytes",
                                                 "Host memory for KV blocks the pool lets go of (--kv-host-memory).")
        self.kv_host_tier_hits = counter("kv_host_tier_hits", "Requests whose cached prefix or session came back "
                                         "from the host tier.")
        self.kv_host_offloaded_bytes = counter("kv_host_offloaded_bytes",
                                               "KV bytes copied from the pool to the host tier.")
        self.kv_host_loaded_bytes = counter("kv_host_loaded_bytes", "KV bytes copied from the host tier to the pool.")
        self.retrieval_recalls = counter("retrieval_recalls", "Prompt chunks of retrieving landmark caches "
                                         "that brought evicted blocks back.")
        self.retrieval_recalled_blocks = counter("retrieval_recalled_blocks",
                                                 "Evicted blocks brought back from host memory into caches.")
        self.retrieval_archive_forgotten_blocks = counter(
            "retrieval_archive_forgotten_blocks", "Evicted blocks that retrieving caches could no longer recall: "
            "dropped from their archives to stay within --retrieval-archive-memory.")
        self.retrieval_archive_bytes = gauge("retrieval_archive_bytes",
                                             "Bytes holding blocks evicted by retrieving landmark caches "
                                             "(host copies, device scoring keys).")

        self.time_to_first_token = histogram("time_to_first_token_seconds",
                                             "Seconds from arrival to the first generated token.", _LATENCY_BUCKETS)
        self.inter_token_latency = histogram("inter_token_latency_seconds",
                                             "Seconds between successive engine steps that gave a request tokens.",
                                             _ITL_BUCKETS)
        self.e2e_request_latency = histogram("e2e_request_latency_seconds",
                                             "Seconds from arrival to the last token.", _LATENCY_BUCKETS)
        self.request_queue_time = histogram("request_queue_time_seconds",
                                            "Seconds from arrival to first being scheduled.", _LATENCY_BUCKETS)
        lengths = length_buckets(info.max_model_len)
        self.request_prompt_tokens = histogram("request_prompt_tokens", "Prompt tokens per request.", lengths)
        self.request_generation_tokens = histogram("request_generation_tokens",
                                                   "Generated tokens per request (all choices).", lengths)

        self.kv_blocks_capacity.set(info.num_blocks)
        self.kv_host_tier_capacity_bytes.set(info.kv_host_tier_bytes)
        self.kv_bytes_capacity.set(info.num_blocks * info.bytes_per_block)
        self._num_blocks = info.num_blocks
        self._bytes_per_block = info.bytes_per_block
        # Engine totals that only grow, each mirrored by a counter: (counter, the snapshot's field).
        self._engine_totals = [
            (self.prompt_tokens, "prompt_tokens"),
            (self.generation_tokens, "generation_tokens"),
            (self.num_preemptions, "num_preemptions"),
            (self.prefix_cache_queries, "prefix_cache_queries"),
            (self.prefix_cache_hits, "prefix_cache_hits"),
            (self.rope_plan_growths, "rope_plan_growths"),
            (self.kv_evictions, "kv_evictions"),
            (self.kv_evicted_tokens, "kv_evicted_tokens"),
            (self.kv_rerotated_keys, "kv_rerotated_keys"),
            (self.landmark_recomputations, "landmark_recomputations"),
            (self.session_hits, "session_hits"),
            (self.session_misses, "session_misses"),
            (self.kv_host_tier_hits, "kv_host_tier_hits"),
            (self.kv_host_offloaded_bytes, "kv_host_offloaded_bytes"),
            (self.kv_host_loaded_bytes, "kv_host_loaded_bytes"),
            (self.retrieval_recalls, "retrieval_recalls"),
            (self.retrieval_recalled_blocks, "retrieval_recalled_blocks"),
            (self.retrieval_archive_forgotten_blocks, "retrieval_archive_forgotten_blocks"),
        ]
        self._previous = StatsSnapshot()

    def observe_engine(self, stats: StatsSnapshot) -> None:
        """Copy one snapshot of the engine core's state (called on the engine's output thread)."""
        self.num_requests_running.set(stats.num_running)
        self.num_requests_waiting.set(stats.num_waiting)
        self.kv_blocks_used.set(stats.kv_used_blocks)
        self.kv_bytes_used.set(stats.kv_used_blocks * self._bytes_per_block)
        self.kv_cache_usage.set(stats.kv_used_blocks / self._num_blocks)
        previous = self._previous
        for counter, name in self._engine_totals:
            grown = getattr(stats, name) - getattr(previous, name)
            if grown > 0:
                counter.inc(grown)
        self._previous = stats
        self.session_store_bytes.set(stats.session_store_blocks * self._bytes_per_block)
        self.retrieval_archive_bytes.set(stats.retrieval_archive_bytes)
        self.kv_host_tier_bytes.set(stats.kv_host_tier_bytes)
        for plan in stats.new_plans:
            self.rope_plan_base.observe(plan.effective_base)
            self.rope_plan_factor.observe(plan.scaling_factor)
        if self.on_cuda:
            self.gpu_allocated.set(stats.gpu_memory_allocated_bytes)
            self.gpu_reserved.set(stats.gpu_memory_reserved_bytes)

    async def tracked(self, outputs: AsyncIterator[RequestOutput], n: int) -> AsyncIterator[RequestOutput]:
        """Pass the outputs of a request with n choices through, observing its latencies and, at
        the end, how each choice finished."""
        last: RequestOutput | None = None
        previous_token_time = None
        try:
            async for output in outputs:
                metrics = output.metrics
                if metrics is not None and metrics.last_token_time is not None:
                    if previous_token_time is None:
                        self.time_to_first_token.observe(metrics.first_token_time - metrics.arrival_time)
                    elif metrics.last_token_time > previous_token_time:
                        # A reader that fell behind gets several tokens in one output: each
                        # counts with its share of the interval.
                        tokens = max(1, max(len(c.delta_token_ids) for c in output.outputs))
                        gap = (metrics.last_token_time - previous_token_time) / tokens
                        for _ in range(tokens):
                            self.inter_token_latency.observe(gap)
                    previous_token_time = metrics.last_token_time
                last = output
                yield output
        finally:
            self._observe_end(last, n)
            # Leaving early must end the request now (the engine's stream aborts it when
            # closed), not whenever the abandoned generator is collected.
            close = getattr(outputs, "aclose", None)
            if close is not None:
                await close()

    def _observe_end(self, last: RequestOutput | None, n: int) -> None:
        if last is None:
            self.request_success.labels(self._model_name, "abort").inc(n)
            return
        for choice in last.outputs:
            self.request_success.labels(self._model_name, choice.finish_reason or "abort").inc()
        if not last.finished:
            return
        self.request_prompt_tokens.observe(len(last.prompt_token_ids))
        self.request_generation_tokens.observe(sum(len(c.token_ids) for c in last.outputs))
        metrics = last.metrics
        if metrics is not None:
            if metrics.first_scheduled_time is not None:
                self.request_queue_time.observe(metrics.first_scheduled_time - metrics.arrival_time)
            if metrics.finished_time is not None:
                self.e2e_request_latency.observe(metrics.finished_time - metrics.arrival_time)
