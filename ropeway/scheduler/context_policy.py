"""How a sequence's KV cache is bounded: none, sink_window (StreamingLLM), or landmark.

Sinks and window are kept in whole blocks: the sink region is the first ceil(sinks /
block_size) blocks, and the window is evicted from its oldest end an eighth at a time
(rounded to blocks), so each kept key is re-rotated a bounded number of times (about 8).
The window is a ceiling: the cache holds at most sinks + region + `window` tokens, and an
eviction leaves window - one eviction chunk of them.
landmark adds, from the first eviction on, a region of ceil(landmarks / block_size) blocks
between sinks and window: one slot per evicted chunk holds that chunk's summary, the
slots used as a ring once all landmarks are taken. With `retrieve`, a recall region of
ceil(retrieve / block_size) blocks follows the landmark slots: evicted blocks are kept in
host memory, and before each prompt chunk the ones whose keys best match its queries are
brought back there (InfLLM-style), so a needle far outside the window can still be found.

Retrieval comes without summaries by default (`landmarks` 0 when `retrieve` is given): no
chunk is re-computed and no landmark region kept. The summaries cost time to first token and,
measured on the needle grid (BENCHMARKS.md, issue 19), distract the model from the blocks
retrieval brings back.
"""

import functools
from dataclasses import dataclass, fields

from ropeway.arith import cdiv
from ropeway.request_bounds import CONTEXT_POLICY_BOUNDS
from ropeway.sampling_params import InvalidParameter

POLICY_TYPES = ("none", "sink_window", "landmark")
DEFAULT_LANDMARKS = 64  # without retrieve
# With retrieve, the queries of a prompt's last tokens (a question, a chat turn) score the archive
# for the answer: enough to reach a question's ask when a format instruction follows it ("...
# What was the code? Reply with the answer alone, nothing else. Answer:", whose last 16 tokens
# name nothing the needle says), and the scheduler leaves a prompt's last chunk at least this
# many tokens, so that they are its own. On the CPU needle grid (BENCHMARKS.md, seventeenth
# session) such questions' needle blocks came back 0.25-0.33 of the time with 16 queries, all of
# them with 64, the other question kinds alike within a trial.
QUESTION_QUERY_TOKENS = 64


@dataclass(frozen=True)
class ContextPolicy:
    type: str = "none"
    sinks: int = 4
    window: int = 4096
    # landmark only: the most chunk summaries kept; None: 64, or 0 (no summaries) with retrieve
    landmarks: int | None = None
    retrieve: int = 0    # landmark only: evicted tokens brought back per prompt chunk (0: none)

    def __post_init__(self):
        if self.landmarks is None:
            object.__setattr__(self, "landmarks", 0 if self.retrieve else DEFAULT_LANDMARKS)

    @property
    def bounded(self) -> bool:
        return self.type != "none"

    def sink_blocks(self, block_size: int) -> int:
        return cdiv(self.sinks, block_size)

    def landmark_blocks(self, block_size: int) -> int:
        return cdiv(self.landmarks, block_size) if self.type == "landmark" else 0

    def recall_blocks(self, block_size: int) -> int:
        return cdiv(self.retrieve, block_size) if self.type == "landmark" else 0

    def region_blocks(self, block_size: int) -> int:
        """Blocks between sinks and window: landmark slots, then recalled blocks."""
        return self.landmark_blocks(block_size) + self.recall_blocks(block_size)

    def eviction_chunk(self, block_size: int) -> int:
        """Tokens evicted at a time: an eighth of the window, in whole blocks (at least one).
        A landmark chunk also covers the region between sinks and window, which the first
        eviction carves out of it."""
        chunk = max(block_size, self.window // 8 // block_size * block_size)
        return max(chunk, self.region_blocks(block_size) * block_size)

    def eviction_unit(self, block_size: int) -> int:
        """Evictions take whole units: chunks where each gets a landmark summary, else blocks."""
        return self.eviction_chunk(block_size) if self.landmark_blocks(block_size) else block_size

    def kept_tokens(self, block_size: int) -> int:
        """The least a cache that has filled holds once more: an eviction (of a chunk, when new
        tokens would pass max_cache_tokens) leaves at least this many, new tokens included."""
        return self.max_cache_tokens(block_size) - self.eviction_chunk(block_size)

    def max_cache_tokens(self, block_size: int) -> int:
        """The most the cache ever holds: sink blocks, region blocks and `window` recent tokens.
        The window is a ceiling, as in StreamingLLM (positions 0..S+W-1): a query never sees a
        window token more than `window` back, so the distance from a question to what sits in
        front of the window (sinks, recalled blocks) is bounded by the window the user chose."""
        return _max_cache_tokens(self, block_size)

    @classmethod
    def from_dict(cls, raw: dict | None, param: str = "context_policy") -> "ContextPolicy":
        if raw is None:
            return cls()
        if not isinstance(raw, dict):
            raise InvalidParameter(param, f'{param} must be an object such as {{"type": "sink_window", '
                                          '"sinks": 4, "window": 4096}')
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise InvalidParameter(f"{param}.{unknown[0]}", f"unknown {param} field {unknown[0]!r}")
        kind = raw.get("type", "none")
        if kind not in POLICY_TYPES:
            raise InvalidParameter(f"{param}.type", f"unknown policy {kind!r}; choose one of {', '.join(POLICY_TYPES)}")
        for name in ("landmarks", "retrieve"):
            if name in raw and kind != "landmark":
                raise InvalidParameter(f"{param}.{name}", f"{name} applies only to the landmark policy")
        for name, bound in CONTEXT_POLICY_BOUNDS.items():
            if name in raw and not bound.contains(raw[name]):
                raise InvalidParameter(f"{param}.{name}", f"{name} must be {bound.describe()}")
        policy = cls(**raw)
        if policy.type == "landmark" and policy.landmarks == 0 and policy.retrieve == 0:
            raise InvalidParameter(f"{param}.landmarks", "landmarks may be 0 only with retrieve > 0 "
                                                         "(a cache of sinks and window alone is sink_window)")
        if policy.type == "landmark" and policy.landmarks + policy.retrieve > policy.window:
            raise InvalidParameter(f"{param}.retrieve" if policy.retrieve else f"{param}.landmarks",
                                   "landmarks + retrieve may not exceed the window")
        return policy


# The scheduler and block manager ask for it per bounded sequence, several times a step: work it
# out once per (policy, block size). Bounded, since requests may each bring a policy of their own.
@functools.lru_cache(maxsize=4096)
def _max_cache_tokens(policy: ContextPolicy, block_size: int) -> int:
    return (policy.sink_blocks(block_size) + policy.region_blocks(block_size)) * block_size + policy.window
