"""Retrieval of evicted blocks for the landmark policy.

A landmark cache with `retrieve` keeps, for every block it evicts, a host copy of the
block's keys (as cached: rotated for the position they had) and values, and on the device
every key of the block before RoPE (the scoring keys). Before each chunk of a prompt is
computed, queries score every archived block and the best go back into the recall region
in their original order, re-rotated once to the region's positions. The final chunk of a
prompt (a question, a new chat turn) is scored with its own last queries (a query pass of
that chunk alone), and the blocks it brings back are then computed afresh in the region
(engine/cache_ops.py); earlier chunks with the last queries of the chunk before them, captured
during that chunk's step.

How a block is scored, and why (needle ranks measured on natural text, questions of 14 to
52 tokens, one repeating the needle's words; BENCHMARKS.md, issue 19):
- A block's logit for a query is its best key's logit (the exact max over its tokens): a
  needle is one or two tokens in a block of filler, and the mean key (the old score, and
  InfLLM's representative mean) or Quest's per-channel bound blur it into the filler.
- Per layer, query token and head, a softmax over all archived blocks turns logits into the
  share of attention each block would draw; shares are summed over heads (where tensor-parallel
  ranks would have to all-reduce). The most any single query token gives a block, over
  what ordinary text gives it (queries spread over the prompt chunk before, the baseline),
  is its score in that layer; layers are averaged. Some blocks draw attention from any query
  (a text's start, recurring phrases): the baseline discounts them. The max over query tokens
  keeps the score independent of the question's length, and a baseline from the text before
  the question keeps the question's own words (repeating the needle's) out of it: the old
  baseline, the 32 tokens before the last 16, cancelled the needle for long questions.
- A chosen block brings its neighbours, the block after it and the block before: the answer
  usually follows the words that matched the question, and a sentence straddles block
  boundaries on either side (16-token blocks; measured on natural text, the best-scored block
  was the needle's middle one with its first, a word or two of the sentence, ranked 18th to
  861st of ~960, missed when only the block after came back).

What a recall costs is kept to a few device operations whatever the model's depth (the time to
first token of a long prompt pays it before every chunk): evicted blocks go to pinned host
memory by copies queued on a stream of their own (nothing waits for them, the scores' read
included) and their scoring keys are rotated back in one re-rotation launch; the queries are
kept by the rotary kernel as it runs (models/llama.py, QueryCapture); on a GPU one kernel scores
every layer (its blocks' best logits, kernels/block_max_logits.py) over scoring keys kept
head-major (read in place) and two more rank the blocks (kernels/block_relevance.py); the host
reads the scores once, where it must (it copies the blocks from host memory), and chooses with
array operations over the best blocks alone; the chosen blocks come back in one launch that
reads them from pinned host memory (kernels/host_blocks.py) and one re-rotation.
"""

import bisect
import weakref
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from ropeway.kernels import block_max_logits, block_relevance
from ropeway.scheduler import RopePlan

# Queries of a prompt chunk's last tokens score the archive before the next chunk: they stand
# for the text being read. (A prompt's last chunk is scored by its last QUESTION_QUERY_TOKENS,
# scheduler/context_policy.py.)
RECALL_QUERY_TOKENS = 16
# Queries spread over a prompt chunk stand for ordinary text in the baseline.
RECALL_BASELINE_TOKENS = 16
# A block's baseline share is floored at this fraction of the mean block's: a block ordinary text
# ignores is not made relevant by a division by nearly nothing.
BASELINE_FLOOR = 0.1
# Blocks brought back after and before each chosen block (the one after first).
RECALL_FOLLOWING_BLOCKS = 1
RECALL_PRECEDING_BLOCKS = 1
# The standout rule (None: off): when few blocks (at most the region's) score within this factor of
# the best one, the region holds contiguous runs around them and nothing else. The other chosen
# blocks were distractors: in licence texts full of dates, blocks of other years beside the needle
# made the model answer another year. Measured on the H200 grid (BENCHMARKS.md, fourteenth
# session): cells within 90% of the oracle 23 of 24 against 21, needle-block recall 0.970 against
# 0.984 (both over the target).
RECALL_STANDOUT_RATIO: float | None = 2.0
# The most memory one scoring product's output takes; layers are scored in groups that fit. On a
# GPU the kernel keeps only each block's best logits (fp32: at 128k archived tokens the default
# model's 30 layers take ~0.3 GB), and scoring is bound by launches: one group. On a CPU the
# product holds every logit, and about a cache's worth was fastest (measured: 8 MiB groups 0.7 s,
# one product 1.6 s, a per-layer loop 1.2-1.6 s).
SCORING_BYTES = {"cuda": 512 << 20, "cpu": 8 << 20}


@dataclass
class ArchivedBlocks:
    kv: torch.Tensor  # [num_blocks, num_layers, 2, ...] on the host, block-major, as the pool holds each block
    block_size: int
    position: int     # cache position of the first token when the blocks were evicted
    plan: RopePlan    # the plan their keys were rotated under
    first_token: int  # token index (in the stream) of the first token
    scoring_bytes: int  # of its scoring keys on the device

    @property
    def num_blocks(self) -> int:
        return self.kv.shape[0]


class RecallArchive:
    """One sequence's evicted blocks, oldest first, with their scoring keys."""

    def __init__(self):
        self.chunks: list[ArchivedBlocks] = []
        self._chunk_ends: list[int] | None = None  # cumulative block counts of the chunks (made when needed)
        # Keys before RoPE on the device, [num_layers, num_kv_heads, capacity, head_dim] in the
        # model's dtype, the first num_tokens filled: one tensor (scoring is one pass), head-major
        # so that the scoring product reads it without a copy, grown by doubling so that
        # appending a chunk does not copy the whole archive.
        self._scoring_keys: torch.Tensor | None = None
        self._blocks: torch.Tensor | None = None  # their block view (_block_view), until they are replaced
        self.num_tokens = 0
        self.num_blocks = 0
        self.num_bytes = 0  # host copies and device scoring keys together

        # Queries [num_layers, Q + B, num_heads, head_dim] of the last prompt chunk computed: its
        # last Q tokens' (num_scoring), which score the archive before the next chunk
        # (scoring_pending until they have), then B tokens' spread over it, the baseline of later
        # scores. One tensor, in the order scoring reads it: one view per chunk, no concatenation.
        self.captured: torch.Tensor | None = None
        self.num_scoring = 0
        self.scoring_pending = False
        # Token index of the first token of each block the last recall brought back.
        self.recalled_tokens: list[int] = []
        self.last_step = 0  # the engine step that last archived into it or recalled from it (ArchiveBudget)

    @property
    def baseline_queries(self) -> torch.Tensor | None:
        """[num_layers, B, num_heads, head_dim]: the last chunk's spread queries (None before any)."""
        return None if self.captured is None else self.captured[:, self.num_scoring :]

    @property
    def scoring_keys(self) -> torch.Tensor | None:
        """[num_layers, archived tokens, num_kv_heads, head_dim]: every archived key before RoPE
        (a view of the head-major keys)."""
        return None if self._scoring_keys is None else self._head_major_keys.transpose(1, 2)

    @property
    def _head_major_keys(self) -> torch.Tensor:
        """[num_layers, num_kv_heads, archived tokens, head_dim]."""
        return self._scoring_keys[:, :, : self.num_tokens]

    def add(self, host_blocks: torch.Tensor, keys: torch.Tensor, position: int, first_token: int, plan: RopePlan,
            turn_back: Callable[[torch.Tensor, int], None]) -> None:
        """Archive evicted blocks whose first token, token first_token of the stream, sat at cache
        position `position` under plan. host_blocks: their host copy [n, num_layers, 2, ...],
        block-major (one copy per recalled block), each block as the pool holds it (its copy may
        still be in flight: recalls wait for it on the device). keys: their keys as numbers on the
        device, [num_layers, n, block_size, Hkv, D] in the model's dtype, any strides.
        turn_back(view, first) re-rotates the new keys, slots first.. of the scoring keys' block
        view (first: num_tokens as this call found it), from their positions and plan to angle 0
        (and undoes YaRN's scale), in place: scoring keys are keys before RoPE (the caller holds
        the RoPE tables)."""
        num_layers, num_blocks, block_size, num_kv_heads, head_dim = keys.shape
        assert host_blocks.is_contiguous()  # a block's address is the start plus its index times its bytes
        n = num_blocks * block_size
        first = self.num_tokens
        self._make_room(num_layers, num_kv_heads, n, head_dim, keys.dtype, keys.device)
        view = self._block_view(block_size)
        view[:, first // block_size : first // block_size + num_blocks] = keys  # one strided copy
        self.num_tokens += n
        turn_back(view, first)
        unrotated_bytes = n * num_layers * num_kv_heads * head_dim * keys.element_size()
        self.chunks.append(ArchivedBlocks(host_blocks, block_size, position, plan, first_token, unrotated_bytes))
        self._chunk_ends = None
        self.num_blocks += num_blocks
        self.num_bytes += host_blocks.nbytes + unrotated_bytes

    def _block_view(self, block_size: int) -> torch.Tensor:
        """The scoring keys seen as a cache of blocks, [num_layers, capacity / block_size, block_size,
        num_kv_heads, head_dim]: a view, as kernels that address keys by slot take them."""
        if self._blocks is None:  # (made once per buffer: a long prompt archives every step)
            num_layers, num_kv_heads, capacity, head_dim = self._scoring_keys.shape
            whole = capacity // block_size
            self._blocks = (self._scoring_keys[:, :, : whole * block_size]
                            .view(num_layers, num_kv_heads, whole, block_size, head_dim).permute(0, 2, 3, 1, 4))
        return self._blocks

    def _make_room(self, num_layers: int, num_kv_heads: int, n: int, head_dim: int, dtype: torch.dtype,
                   device: torch.device) -> None:
        """Room for n more scoring keys (doubling: appending does not copy the whole archive)."""
        needed = self.num_tokens + n
        if self._scoring_keys is None or needed > self._scoring_keys.shape[2]:
            grown = torch.empty(num_layers, num_kv_heads, max(needed, 2 * self.num_tokens), head_dim, dtype=dtype,
                                device=device)
            if self.num_tokens:
                grown[:, :, : self.num_tokens] = self._head_major_keys
            self._scoring_keys, self._blocks = grown, None

    def drop_oldest(self) -> int:
        """Forget the oldest archived chunk; returns its number of blocks."""
        oldest = self.chunks.pop(0)
        self._chunk_ends = None
        num_tokens = oldest.num_blocks * oldest.block_size
        self._scoring_keys, self._blocks = self._head_major_keys[:, :, num_tokens:].clone(), None
        self.num_tokens -= num_tokens
        self.num_blocks -= oldest.num_blocks
        self.num_bytes -= oldest.kv.nbytes + oldest.scoring_bytes
        return oldest.num_blocks

    def select(self, queries: torch.Tensor, num_queries: int, count: int, scale: float) -> list[int]:
        """Indices (oldest first) of at most count archived blocks to bring back for queries
        [num_layers, R, num_heads, head_dim] (before RoPE): the first num_queries rows score, the
        rest are the baseline (none: no baseline). The scores are read once (the recall's one host
        sync: the host makes the choice; CacheOps.bring_back relies on it too, to release the
        pinned memory its last kernel read) and the choice is made on the host."""
        scores = self.block_scores(queries, num_queries, scale)
        return choose_blocks(scores.cpu().numpy(), count).tolist()

    def block_scores(self, queries: torch.Tensor, num_queries: int, scale: float) -> torch.Tensor:
        """[num_blocks]: per layer, the most attention any one scoring query (the first
        num_queries rows of queries) would give each block (softmax over blocks of each block's
        best key, summed over heads) over the mean the baseline queries (the other rows) give it
        (plus a tenth of the mean block's); averaged over layers. (Every head's shares are needed:
        under tensor parallelism, where the landmark policy is refused, ranks would all-reduce the
        head sums before the division.)"""
        num_layers, _, num_heads, _ = queries.shape
        keys = self._head_major_keys
        block_size = self.chunks[0].block_size
        # A baseline query's shares over the blocks sum to its number of heads: the mean block's
        # share is num_heads / blocks.
        floor = BASELINE_FLOOR * num_heads / self.num_blocks
        # What a layer's product holds at once: its logits in the reference (CPU), the blocks'
        # best logits in the kernel (CUDA).
        per_key = keys.element_size() if keys.device.type == "cpu" else 4 / block_size
        per_layer = queries.shape[1] * num_heads * keys.shape[2] * per_key
        group = max(1, int(SCORING_BYTES.get(keys.device.type, SCORING_BYTES["cpu"]) // per_layer))
        score = None  # (summed as groups come: on a GPU there is one, and each op costs the host)
        for first in range(0, num_layers, group):
            layers = slice(first, min(first + group, num_layers))
            best = block_max_logits(queries[layers], keys[layers], block_size, scale)  # [l, Hkv, Q, group, blocks]
            part = block_relevance(best, num_queries, floor, 1 / num_layers)
            score = part if score is None else score + part
        return score

    def runs(self, indices: list[int]) -> list[tuple[torch.Tensor, int, RopePlan]]:
        """The archived blocks indices (ascending) as runs of blocks adjacent in host memory:
        kv [n, num_layers, 2, ...], the run's first token's position when evicted, its plan."""
        runs: list[tuple[torch.Tensor, int, RopePlan]] = []
        last = None
        for index in indices:
            chunk, offset = self._locate(index)
            if last is not None and last[0] is chunk and last[2] == offset:
                last[2] = offset + 1
            else:
                last = [chunk, offset, offset + 1]
                runs.append(last)
        return [(chunk.kv[start:stop], chunk.position + start * chunk.block_size, chunk.plan)
                for chunk, start, stop in runs]

    def block(self, index: int) -> tuple[torch.Tensor, int, RopePlan]:
        """Archived block index: kv [num_layers, 2, ...] as the pool holds a block, its first
        token's position when evicted, its plan."""
        chunk, offset = self._locate(index)
        return chunk.kv[offset], chunk.position + offset * chunk.block_size, chunk.plan

    def first_token(self, index: int) -> int:
        """Token index (in the stream) of archived block index's first token."""
        chunk, offset = self._locate(index)
        return chunk.first_token + offset * chunk.block_size

    def _locate(self, index: int) -> tuple[ArchivedBlocks, int]:
        # A long prompt archives a chunk per step: searched, not walked (a recall locates each
        # chosen block twice).
        if self._chunk_ends is None:
            self._chunk_ends = np.cumsum([chunk.num_blocks for chunk in self.chunks]).tolist()
        if not 0 <= index < self.num_blocks:
            raise IndexError(index)
        at = bisect.bisect_right(self._chunk_ends, index)
        return self.chunks[at], index - (self._chunk_ends[at - 1] if at else 0)


def choose_blocks(scores: np.ndarray, count: int) -> np.ndarray:
    """Indices (ascending) of min(count, blocks) blocks for scores [blocks]: the standout
    rule's choice where it applies (runs_around_standouts), else the best-scored block, then the
    RECALL_FOLLOWING_BLOCKS after it, then the RECALL_PRECEDING_BLOCKS before it (nearest first),
    then the next best with its neighbours, ..., blocks not yet taken taken in that order until
    count are. Array operations, not that loop (a long prompt chooses before each chunk, among
    thousands of blocks): each block is ranked by the best block that brings it (the best of
    itself and its neighbours), then by its place among that one's neighbours, and the lowest
    ranks win. Only the count best blocks can bring a chosen one (each brings at least itself),
    so only they are ranked and only their neighbourhoods placed: linear in the blocks (a full
    sort of 8k blocks, at 128k tokens, took ~1 ms of the host per chunk)."""
    num_blocks = scores.size
    after, before = RECALL_FOLLOWING_BLOCKS, RECALL_PRECEDING_BLOCKS
    count = min(count, num_blocks)
    if count == 0:
        return np.zeros(0, dtype=np.int64)
    # The standout rule looks one block past the count.
    order = best_first(scores, count + 1)
    if RECALL_STANDOUT_RATIO is not None and num_blocks > count:
        standout = runs_around_standouts(scores, order, count, RECALL_STANDOUT_RATIO)
        if standout is not None:
            return np.asarray(standout, dtype=np.int64)
    seeds = order[:count]
    rank = np.full(num_blocks + after + before, count, dtype=np.int64)  # padded: past the ends, never a seed
    rank[seeds + after] = np.arange(count)
    # Blocks a seed may bring, and for each the seeds that may bring it: blocks j - after .. j + before.
    shifts = np.arange(-after, before + 1)
    near = np.unique((seeds[:, None] + shifts[None, :]).ravel())
    near = near[(near >= 0) & (near < num_blocks)]
    windows = rank[near[None, :] + shifts[:, None] + after]  # [shifts, near]
    seed_at = windows.argmin(0)
    seed_rank = windows[seed_at, np.arange(near.size)]
    distance = shifts[seed_at]  # the seed's place from j: < 0 before j (j follows it), > 0 after j
    place_among_neighbours = np.where(distance <= 0, -distance, after + distance)
    place = seed_rank * (after + before + 1) + place_among_neighbours
    return np.sort(near[np.argsort(place, kind="stable")[:count]])


def best_first(scores: np.ndarray, count: int) -> np.ndarray:
    """The first count indices of a stable sort of scores by falling score (ties: lower index
    first), without sorting them all."""
    if count >= scores.size:
        return np.argsort(-scores, kind="stable")
    threshold = -np.partition(-scores, count - 1)[count - 1]  # the count-th best score
    if np.isnan(threshold):
        return np.argsort(-scores, kind="stable")[:count]
    above, tied = np.flatnonzero(scores > threshold), np.flatnonzero(scores == threshold)
    taken = np.concatenate([above, tied[: count - above.size]])
    return taken[np.argsort(-scores[taken], kind="stable")]


def runs_around_standouts(scores: np.ndarray, order: np.ndarray, count: int, ratio: float) -> list[int] | None:
    """The standout rule's choice (RECALL_STANDOUT_RATIO), or None where more than count blocks
    score within a factor `ratio` of the best: those blocks, each widened one block at a time on
    both sides (the best first) until count blocks are taken; ascending. order: the blocks by
    falling score (at least the count + 1 best)."""
    ranked = scores[order]
    below = np.flatnonzero(ranked < ranked[0] / ratio)
    if not below.size or below[0] > count:
        return None
    standouts = order[: below[0]].tolist()
    chosen = set(standouts)
    distance, count = 1, min(count, len(scores))
    while len(chosen) < count:
        for block in standouts:
            for near in (block + distance, block - distance):
                if 0 <= near < len(scores) and len(chosen) < count:
                    chosen.add(near)
        distance += 1
    return sorted(chosen)


class ArchiveBudget:
    """Bytes all archives may hold together (host copies and scoring keys). Over it, archives
    nobody has used for IDLE_STEPS steps go first, least recently used first: those of finished
    requests kept by the session store, and of streams that are only decoding (neither needs its
    archive before its next prompt). Only then does the largest archive in use drop its oldest
    chunk (a long stream forgets its distant past before a short one does). Without the first
    rule, sessions kept from earlier requests ate the distant past of the long prompts running
    now (needle-block recall 0 at 64k-128k on the H200)."""

    IDLE_STEPS = 16

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.archives: weakref.WeakSet[RecallArchive] = weakref.WeakSet()  # freed with their sequences
        self.step = 0
        # Archived blocks forgotten to stay within the budget: a stream can no longer recall them
        # (a metric, and what a benchmark checks before blaming the retriever for a lost needle).
        self.num_forgotten_blocks = 0
        # Of those, the ones taken from archives in use (not idle: a prompt being read).
        self.num_forgotten_in_use_blocks = 0

    def next_step(self) -> None:
        self.step += 1

    def touch(self, archive: RecallArchive) -> None:
        archive.last_step = self.step

    def track(self, archive: RecallArchive) -> None:
        self.archives.add(archive)
        self.touch(archive)
        while self.num_bytes > self.max_bytes:
            victim = self._victim()
            if victim is None:
                break
            in_use = not self._idle(victim)
            dropped = victim.drop_oldest()
            self.num_forgotten_blocks += dropped
            self.num_forgotten_in_use_blocks += dropped if in_use else 0

    def _victim(self) -> "RecallArchive | None":
        holding = [a for a in self.archives if a.chunks]
        idle = [a for a in holding if self._idle(a)]
        if idle:
            return min(idle, key=lambda a: a.last_step)
        return max(holding, key=lambda a: a.num_bytes, default=None)

    def _idle(self, archive: RecallArchive) -> bool:
        return archive.last_step < self.step - self.IDLE_STEPS

    @property
    def num_bytes(self) -> int:
        return sum(a.num_bytes for a in self.archives)
