"""One generated sequence (one of a request's n choices), as the scheduler sees it."""

import enum
from dataclasses import dataclass, field

from .context_policy import ContextPolicy
from .rope_plan import RopePlan
from .rope_scaling import RopeScaling


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    seq_id: int
    request_id: str
    choice_index: int
    prompt_token_ids: list[int]
    rope_plan: RopePlan | None  # None: the scheduler plans it on arrival
    # Arrival order across the engine: preemption picks the newest, admission the oldest.
    arrival: int
    max_total_tokens: int
    planned_length: int = 0                 # prompt + max_tokens, capped: what the plan is sized for
    rope_scaling: RopeScaling | None = None  # the request's own scaling, over the server's
    context_policy: ContextPolicy = ContextPolicy()
    # Tokens dropped from the cache between the sinks and the window. Cache positions stay
    # contiguous: token i >= the window start sits at position i - num_evicted_tokens.
    num_evicted_tokens: int = 0
    # Cache positions of the region after the sinks (landmark slots, recalled blocks),
    # reserved at the first eviction.
    num_region_positions: int = 0
    # Host copies of blocks evicted from this cache, for recall (engine-owned: the scheduler
    # only carries it along with the cache, and drops it when the cache is dropped).
    archive: object | None = None
    wants_prompt_logprobs: bool = False
    token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    block_table: list[int] = field(default_factory=list)
    status: SequenceStatus = SequenceStatus.WAITING
    num_cached_prompt_tokens: int = 0  # prompt tokens served from the prefix cache at first admission
    num_preemptions: int = 0
    block_hashes: list[bytes] = field(default_factory=list)  # chained hashes of full blocks, filled lazily
    # The prompt's token ids as int64 bytes, made when a bounded sequence is queued: the session
    # store hashes them at admission, and converting 32k ids there would cost that step ~0.4 ms.
    prompt_bytes: bytes = field(default=b"", repr=False)

    def __post_init__(self):
        if not self.token_ids:
            self.token_ids = list(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_cached_positions(self) -> int:
        """Length of the sequence's cache (positions 0..this-1)."""
        return self.num_computed_tokens - self.num_evicted_tokens + self.num_region_positions

    @property
    def num_uncomputed_tokens(self) -> int:
        return self.num_tokens - self.num_computed_tokens

    @property
    def prompt_done(self) -> bool:
        return self.num_computed_tokens >= self.num_prompt_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED
