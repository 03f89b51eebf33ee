"""Batched sampling: penalties, temperature, top-k, top-p, min-p, seeded draws, logprobs.

One set of tensor operations serves the whole batch; the only per-row Python is building
the small parameter tensors.
"""

from dataclasses import dataclass

import torch

from ropeway.sampling_params import SamplingParams

from .random_stream import uniform_noise


@dataclass
class SamplingRow:
    params: SamplingParams
    seed: int                 # the row's random stream (the request's seed mixed with the choice)
    prompt_token_ids: list[int]
    token_ids: list[int]      # the prompt, then the output so far (the sequence's own list: not copied)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - len(self.prompt_token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[len(self.prompt_token_ids) :]


@dataclass
class SamplerOutput:
    token_ids: list[int]
    logprobs: list[float] | None            # the sampled tokens' logprobs
    top_token_ids: list[list[int]] | None   # per row, the top-k tokens (k = max asked in the batch)
    top_logprobs: list[list[float]] | None


def _to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on the device without waiting for the GPU: a copy from pageable memory
    would block the host until the model's queued step has finished."""
    if device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor


def _column(rows, value, dtype, device):
    return _to_device(torch.tensor([value(r) for r in rows], dtype=dtype), device)


def _token_counts(token_lists: list[list[int]], vocab_size: int, device) -> torch.Tensor:
    """[R, V] how often each token occurs in each row's list."""
    width = max((len(t) for t in token_lists), default=0)
    counts = torch.zeros(len(token_lists), vocab_size + 1, device=device)
    if width:
        padded = torch.full((len(token_lists), width), vocab_size, dtype=torch.int64)
        for i, tokens in enumerate(token_lists):
            padded[i, : len(tokens)] = torch.tensor(tokens, dtype=torch.int64)
        counts.scatter_add_(1, _to_device(padded, device), torch.ones(padded.shape, device=device))
    return counts[:, :vocab_size]


def apply_penalties(logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    device, vocab = logits.device, logits.shape[1]
    presence = _column(rows, lambda r: r.params.presence_penalty, torch.float32, device)
    frequency = _column(rows, lambda r: r.params.frequency_penalty, torch.float32, device)
    repetition = _column(rows, lambda r: r.params.repetition_penalty, torch.float32, device)
    output_counts = _token_counts([r.output_token_ids for r in rows], vocab, device)
    if any(r.params.repetition_penalty != 1.0 for r in rows):
        seen = (_token_counts([r.prompt_token_ids for r in rows], vocab, device) + output_counts) > 0
        penalty = repetition[:, None]
        penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
        logits = torch.where(seen, penalised, logits)
    logits = logits - frequency[:, None] * output_counts - presence[:, None] * (output_counts > 0)
    return logits


def filter_logits(logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    """Mask (to -inf) what top-k, top-p and min-p exclude. (Which filters run is decided
    from the Python-side params: no device sync.)"""
    device, vocab = logits.device, logits.shape[1]
    top_k = _column(rows, lambda r: r.params.top_k or vocab, torch.int64, device)
    top_p = _column(rows, lambda r: r.params.top_p, torch.float32, device)
    min_p = _column(rows, lambda r: r.params.min_p, torch.float32, device)
    if any(0 < r.params.top_k < vocab or r.params.top_p < 1.0 for r in rows):
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        rank = torch.arange(vocab, device=device)[None, :]
        sorted_logits = sorted_logits.masked_fill(rank >= top_k[:, None], float("-inf"))
        probs = sorted_logits.softmax(dim=-1)
        # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
        mass_before = probs.cumsum(dim=-1) - probs
        sorted_logits = sorted_logits.masked_fill(mass_before > top_p[:, None], float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(1, order, sorted_logits)
    if any(r.params.min_p > 0 for r in rows):
        probs = logits.softmax(dim=-1)
        logits = logits.masked_fill(probs < min_p[:, None] * probs.max(dim=-1, keepdim=True).values,
                                    float("-inf"))
    return logits


def is_plain_argmax(params: SamplingParams) -> bool:
    """Greedy with nothing else to compute: the token is the logits' argmax, on the device."""
    return params.greedy and params.logprobs is None and not _has_penalty(params)


def sample(logits: torch.Tensor, rows: list[SamplingRow]) -> SamplerOutput:
    """logits [R, V] fp32, one row per sequence that samples this step."""
    if all(is_plain_argmax(r.params) for r in rows):
        # The common serving case: one argmax kernel and one read of the tokens, nothing
        # built on the host.
        return SamplerOutput(logits.argmax(dim=-1).tolist(), None, None, None)
    device = logits.device
    want = [r.params.logprobs for r in rows if r.params.logprobs is not None]
    # Logprobs report the model's distribution, before penalties and filters; only when asked.
    raw_logprobs = logits.log_softmax(dim=-1) if want else None
    logits = apply_penalties(logits, rows) if any(_has_penalty(r.params) for r in rows) else logits
    greedy = _column(rows, lambda r: r.params.greedy, torch.bool, device)
    chosen = logits.argmax(dim=-1)
    if not all(r.params.greedy for r in rows):
        temperature = _column(rows, lambda r: 1.0 if r.params.greedy else r.params.temperature,
                              torch.float32, device)
        scaled = filter_logits(logits / temperature[:, None], rows)
        seeds = _column(rows, lambda r: r.seed, torch.int64, device)
        steps = _column(rows, lambda r: r.num_output_tokens, torch.int64, device)
        # Exponential race: argmax p_i / E_i with E_i ~ Exp(1) draws i with probability p_i.
        exponential = -torch.log(uniform_noise(seeds, steps, logits.shape[1]))
        drawn = (scaled.softmax(dim=-1) / exponential).argmax(dim=-1)
        chosen = torch.where(greedy, chosen, drawn)

    if not want:
        return SamplerOutput(chosen.tolist(), None, None, None)
    sampled_logprobs = raw_logprobs.gather(1, chosen[:, None])[:, 0]
    k = max(want)
    top_values, top_ids = raw_logprobs.topk(k, dim=-1) if k else (raw_logprobs[:, :0], chosen[:, None][:, :0])
    return SamplerOutput(chosen.tolist(), sampled_logprobs.tolist(), top_ids.tolist(), top_values.tolist())


def _has_penalty(params: SamplingParams) -> bool:
    return params.presence_penalty != 0 or params.frequency_penalty != 0 or params.repetition_penalty != 1.0
