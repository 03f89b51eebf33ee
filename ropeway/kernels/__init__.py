"""Ops used by the model, each with one signature and two implementations.

Torch reference versions run on CPU and are the ground truth in tests; Triton versions
run on CUDA tensors. Attention and RoPE + KV write on CPU take fast paths (cpu_attention.py,
cpu_rotary_write_kv.py) that tests hold equal to their references. The public functions below
pick by the tensors' device, and import the Triton modules only then, so a CPU server never
imports triton.
"""

import os

import torch
import torch.nn.functional as F

from .block_max_logits import block_max_logits_reference
from .block_relevance import block_relevance_reference
from .host_blocks import blocks_from_host_reference
from .cpu_attention import paged_attention_cpu, plan_cpu_attention
from .cpu_linear import linear_packed, pack_linear_weight
from .cpu_rotary_write_kv import plan_cpu_rotary, rotary_write_kv_cpu
from .kv_cache import write_kv_reference
from .rerotate import rerotate_keys_reference
from .rms_norm import add_rms_norm_reference, rms_norm_reference
from .rotary import apply_rotary_reference
from .rotary_write_kv import rotary_write_kv_reference
from .sampling import filtered_draw_reference, mask_by_bitmask
from .silu_mul import silu_mul_reference


def apply_rotary(q, k, positions, seq_index, inv_freq, attention_factor) -> None:
    if q.is_cuda:
        from .triton_rotary import apply_rotary_triton
        apply_rotary_triton(q, k, positions, seq_index, inv_freq, attention_factor)
    else:
        apply_rotary_reference(q, k, positions, seq_index, inv_freq, attention_factor)


def write_kv(k, v, k_cache, v_cache, slot_mapping) -> None:
    if k.is_cuda:
        from .triton_kv_cache import write_kv_triton
        write_kv_triton(k, v, k_cache, v_cache, slot_mapping)
    else:
        write_kv_reference(k, v, k_cache, v_cache, slot_mapping)


def plan_rotary_write_kv(positions, seq_index, inv_freq, attention_factor, slot_mapping):
    """What rotary_write_kv can work out once per batch for all layers: a plan on CPU (cos/sin,
    cache slots), None on CUDA (the kernel reads the batch's tensors directly)."""
    if positions.is_cuda:
        return None
    return plan_cpu_rotary(positions, seq_index, inv_freq, attention_factor, slot_mapping)


def rotary_write_kv(q, k, v, k_cache, v_cache, slot_mapping, positions, seq_index, inv_freq,
                    attention_factor, k_scale=None, v_scale=None, plan=None, capture=None,
                    capture_rows=None) -> None:
    """apply_rotary(q, k, ...) then write_kv(k, v, ...): one launch on CUDA. With k_scale,
    v_scale the caches are fp8 (fp8_kv.py) and the launch also quantizes. capture [U, Hq, D]
    with capture_rows [T] (int64, -1 for none): token t's queries before RoPE are also copied
    to row capture_rows[t], in the same launch. On CPU an fp8 cache takes the reference;
    otherwise the fast path (cpu_rotary_write_kv.py) with this batch's plan_rotary_write_kv
    (None: made here)."""
    if q.is_cuda:
        from .triton_rotary_write_kv import rotary_write_kv_triton
        rotary_write_kv_triton(q, k, v, k_cache, v_cache, slot_mapping, positions, seq_index,
                               inv_freq, attention_factor, k_scale, v_scale, capture, capture_rows)
        return
    if capture is not None:
        kept = capture_rows >= 0
        capture[capture_rows[kept]] = q[kept]
    if k_scale is not None:
        rotary_write_kv_reference(q, k, v, k_cache, v_cache, slot_mapping, positions, seq_index,
                                  inv_freq, attention_factor, k_scale, v_scale)
        return
    if plan is None:
        plan = plan_cpu_rotary(positions, seq_index, inv_freq, attention_factor, slot_mapping)
    rotary_write_kv_cpu(q, k, v, k_cache, v_cache, plan)


# Prefill chunks of this many queries go to cuDNN on CUDA (kernels/cudnn_attention.py).
# On the H200 cuDNN runs a 4k chunk 1.5-1.7x faster than Triton at any prefix (2k chunks:
# 1.6x past 4k keys, 0.9x on their own). Each new shape costs cuDNN a ~75 ms plan, though,
# and the default 2,048-token budget makes chunks of every size: they stay in Triton, where
# a cold server's long prompts measured half the TTFT. Budgets of 4k+ tokens per step, as
# long-prompt deployments set, make chunks of a few sizes, whose plans are soon all made.
LONG_CHUNK_MIN_QUERIES = 4096


def is_long_chunk(num_queries):
    """For an int, or elementwise for an array of query counts."""
    return num_queries >= LONG_CHUNK_MIN_QUERIES


def warm_up_long_chunk_attention(device, dtype, num_heads, num_kv_heads, head_dim) -> None:
    """Loads cuDNN's attention where long chunks will use it (no-op elsewhere)."""
    if device.type != "cuda":
        return
    from .cudnn_attention import cudnn_prefill_usable, warm_up
    if cudnn_prefill_usable(torch.empty(0, device=device, dtype=dtype)):
        warm_up(device, dtype, num_heads, num_kv_heads, head_dim)


def plan_attention(block_tables, seq_lens, query_start_loc, block_size, slot_bias=None):
    """What paged_attention can work out once per batch for all layers: a plan on CPU, None
    on CUDA (the kernels read the batch's tensors directly)."""
    if block_tables.is_cuda:
        return None
    return plan_cpu_attention(block_tables, seq_lens, query_start_loc, block_size, slot_bias)


def paged_attention(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale,
                    max_query_len=None, max_seq_len=None, slot_bias=None, num_decode_seqs=0,
                    long_chunks=(), plan=None, k_scale=None, v_scale=None):
    """num_decode_seqs: how many leading sequences have one query; long_chunks: (first query,
    queries, cached tokens before them) of the last sequences, chunks that is_long_chunk
    picks. Both are launch hints only: the result is the same without them. plan: this
    batch's plan_attention (None: made per call where one is needed). k_scale, v_scale: the
    caches are fp8 (fp8_kv.py), dequantized as they are read."""
    if q.is_cuda:
        from .triton_attention import paged_attention_triton
        return paged_attention_triton(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc,
                                      scale, max_query_len, max_seq_len, slot_bias=slot_bias,
                                      num_decode_seqs=num_decode_seqs, long_chunks=long_chunks,
                                      k_scale=k_scale, v_scale=v_scale)
    return paged_attention_cpu(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale, slot_bias,
                               plan, k_scale, v_scale)


def rms_norm(x, weight, eps):
    if x.is_cuda:
        from .triton_rms_norm import rms_norm_triton
        return rms_norm_triton(x, weight, eps)
    return rms_norm_reference(x, weight, eps)


def add_rms_norm(delta, residual, weight, eps):
    """residual += delta in place; returns rms_norm(residual)."""
    if residual.is_cuda:
        from .triton_rms_norm import add_rms_norm_triton
        return add_rms_norm_triton(delta, residual, weight, eps)
    return add_rms_norm_reference(delta, residual, weight, eps)


# ROPEWAY_GEMV=0 keeps cuBLAS for one-token steps too (for A/B timings).
_GEMV_DISABLED = os.environ.get("ROPEWAY_GEMV") == "0"


def _takes_gemv(x, weight, bias=None) -> bool:
    """One-token CUDA steps (batch-1 decode) go to the Triton GEMV; cuBLAS wins from 2 rows on.
    Anything the kernel does not handle as F.linear would (mixed dtypes, strided operands)
    stays with F.linear."""
    return (x.is_cuda and not _GEMV_DISABLED and x.dim() == 2 and x.shape[0] == 1 and x.stride(1) == 1
            and x.dtype in (torch.bfloat16, torch.float16) and weight.dtype == x.dtype
            and weight.is_contiguous()
            and (bias is None or (bias.dtype == x.dtype and bias.is_contiguous())))


def linear(x, weight, bias=None):
    """x @ weight.T + bias, as F.linear; weight may be packed for the CPU (cpu_linear.py)."""
    if weight.is_mkldnn:
        return linear_packed(x, weight, bias)
    if _takes_gemv(x, weight, bias):
        from .triton_gemv import gemv_triton
        return gemv_triton(x, weight, bias)
    return F.linear(x, weight, bias)


def linear_silu_mul(x, gate_up_weight):
    """silu_mul(linear(x, gate_up_weight)): one launch for a one-token CUDA step."""
    if _takes_gemv(x, gate_up_weight) and gate_up_weight.shape[0] % 2 == 0:
        from .triton_gemv import gemv_triton
        return gemv_triton(x, gate_up_weight, silu_mul=True)
    return silu_mul(linear(x, gate_up_weight))


def silu_mul(gate_up):
    """silu(gate) * up for gate_up [T, 2I] (gate first): [T, I]."""
    if gate_up.is_cuda:
        from .triton_silu_mul import silu_mul_triton
        return silu_mul_triton(gate_up)
    return silu_mul_reference(gate_up)


def block_max_logits(queries, keys, block_size, scale):
    """Each key block's best logit for each query (block_max_logits.py says how and why)."""
    if keys.is_cuda:
        from .triton_block_max_logits import block_max_logits_triton
        return block_max_logits_triton(queries, keys, block_size, scale)
    return block_max_logits_reference(queries, keys, block_size, scale)


def block_relevance(best, num_queries, floor, weight):
    """Each block's relevance to the scoring rows over the baseline rows, summed over layers
    (block_relevance.py says how)."""
    if best.is_cuda:
        from .triton_block_relevance import block_relevance_triton
        return block_relevance_triton(best, num_queries, floor, weight)
    return block_relevance_reference(best, num_queries, floor, weight)


def blocks_from_host(kv_cache, destinations, runs, addresses):
    """Archived blocks (runs of host tensors; on CUDA read by their blocks' addresses, pinned)
    into pool blocks `destinations` (host_blocks.py)."""
    if kv_cache.is_cuda:
        from .triton_host_blocks import blocks_from_host_triton
        blocks_from_host_triton(kv_cache, destinations, addresses)
    else:
        blocks_from_host_reference(kv_cache, destinations, runs)


def rerotate_keys(k_cache, slots, old_positions, new_positions, old_rows, new_rows, inv_freq_table, factor_table,
                  k_scale=None) -> None:
    """Rows: of the RoPE tables (rerotate.py). k_scale: the cache is fp8 (fp8_kv.py); keys are
    dequantized, rotated, re-quantized."""
    if k_cache.is_cuda:
        from .triton_rerotate import rerotate_keys_triton
        rerotate_keys_triton(k_cache, slots, old_positions, new_positions, old_rows, new_rows, inv_freq_table,
                             factor_table, k_scale)
    else:
        rerotate_keys_reference(k_cache, slots, old_positions, new_positions, old_rows, new_rows, inv_freq_table,
                                factor_table, k_scale)


__all__ = ["apply_rotary", "write_kv", "rotary_write_kv", "plan_rotary_write_kv", "plan_attention", "paged_attention",
           "is_long_chunk",
           "warm_up_long_chunk_attention", "warm_up_sampling", "rms_norm", "add_rms_norm", "silu_mul", "rerotate_keys",
           "block_max_logits", "block_relevance", "blocks_from_host",
           "filtered_draw", "logprob_terms", "mask_by_bitmask", "linear", "linear_silu_mul", "pack_linear_weight"]


def warm_up_sampling(vocab: int, max_rows: int, device: torch.device) -> None:
    """On CUDA, compile the draw's kernel variants for batches of up to max_rows rows now."""
    if device.type == "cuda":
        from .triton_sampling import warm_up_filtered_draw
        warm_up_filtered_draw(vocab, max_rows, device)


def filtered_draw(scaled, cut, top_p, row_max, stream_keys, search: bool):
    """The seeded draw of sampling after its top-p cut search (kernels/sampling.py says what)."""
    if scaled.is_cuda:
        from .triton_sampling import filtered_draw_triton
        return filtered_draw_triton(scaled, cut, top_p, row_max, stream_keys, search)
    return filtered_draw_reference(scaled, cut, top_p, row_max, stream_keys, search)


def logprob_terms(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """[R] row maxima, [R] logs of sum(exp(logits - max)), and the [R, k] top logits with their
    tokens: logits.log_softmax(-1) is (logits - max) - log_sum, its own formula, so the top
    logprobs cost no [R, V] output (on CUDA one read of the logits: triton_sampling.py)."""
    if logits.is_cuda:
        from .triton_sampling import logprob_terms_triton
        return logprob_terms_triton(logits, k)
    row_max = logits.amax(dim=-1)
    log_sum = (logits - row_max[:, None]).exp_().sum(dim=-1).log_()
    return row_max, log_sum, *logits.topk(k, dim=-1)
