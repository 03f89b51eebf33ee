"""The engine core's state as data: one small snapshot per step, rendered by /metrics.

The engine core fills a snapshot from its own objects on its own thread, where they are
consistent; the API side only reads snapshots, so nothing outside the engine core ever
touches (or mutates) the scheduler, the block manager or the runner.
"""

import msgspec


class PlanChoice(msgspec.Struct, array_like=True):
    """A RoPE plan chosen or grown (for the plan histograms)."""
    effective_base: float
    scaling_factor: float


class StatsSnapshot(msgspec.Struct, omit_defaults=True):
    # Gauges: the state after the step.
    num_running: int = 0
    num_waiting: int = 0
    kv_used_blocks: int = 0
    session_store_blocks: int = 0
    retrieval_archive_bytes: int = 0
    kv_host_tier_bytes: int = 0
    gpu_memory_allocated_bytes: int = 0
    gpu_memory_reserved_bytes: int = 0
    # Totals since start-up (Prometheus counters).
    prompt_tokens: int = 0
    generation_tokens: int = 0
    steps: int = 0
    num_preemptions: int = 0
    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0
    rope_plan_growths: int = 0
    kv_evictions: int = 0
    kv_evicted_tokens: int = 0
    kv_rerotated_keys: int = 0
    landmark_recomputations: int = 0
    session_hits: int = 0
    session_misses: int = 0
    retrieval_recalls: int = 0
    retrieval_recalled_blocks: int = 0
    retrieval_archive_forgotten_blocks: int = 0
    request_failures: int = 0
    kv_host_tier_hits: int = 0          # requests that brought blocks back from the host tier
    kv_host_offloaded_bytes: int = 0    # pool -> host
    kv_host_loaded_bytes: int = 0       # host -> pool
    # Plans chosen since the previous snapshot (each snapshot carries only its own).
    new_plans: list[PlanChoice] = []
