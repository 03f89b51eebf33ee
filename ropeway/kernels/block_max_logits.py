"""Each key block's best logit for each query: what retrieval scores archived blocks by
(engine/recall.py).

A block's logit for a query is the max over its tokens' keys, exact: a needle is one or two
tokens in a block of filler, and a mean or a bound would blur it. The products are rounded to
the keys' dtype before the max (as a matmul in that dtype gives them), then scaled in fp32.
"""

import torch


def block_max_logits_reference(queries: torch.Tensor, keys: torch.Tensor, block_size: int,
                               scale: float) -> torch.Tensor:
    """queries [L, R, H, D] (any dtype, any strides), keys [L, Hkv, N, D] head-major, N a
    multiple of block_size (H a multiple of Hkv: query head h reads KV head h // (H / Hkv)).
    Returns fp32 [L, Hkv, R, H / Hkv, N / block_size]: scale times the max over each block's
    keys of query . key."""
    num_layers, num_rows, num_heads, head_dim = queries.shape
    num_kv_heads, num_keys = keys.shape[1], keys.shape[2]
    group = num_heads // num_kv_heads
    # [L, Hkv, R * group, D]: each KV head's queries in one matrix, one batched product.
    grouped = (queries.to(keys.dtype).reshape(num_layers, num_rows, num_kv_heads, group, head_dim)
               .transpose(1, 2).reshape(num_layers, num_kv_heads, num_rows * group, head_dim))
    logits = torch.matmul(grouped, keys.transpose(-1, -2))
    best = logits.view(num_layers, num_kv_heads, num_rows, group, num_keys // block_size, block_size).amax(-1)
    return best.float() * scale
