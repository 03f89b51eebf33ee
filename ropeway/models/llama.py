"""Llama-family decoder (Llama 2/3, Mistral, Qwen2, SmolLM) over a flat batch and a paged cache.

q/k/v and gate/up projections are fused into one matrix each at load time: one GEMM
instead of three (two) per layer.
"""

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch

from ropeway.kernels import (add_rms_norm, linear, linear_silu_mul, pack_linear_weight, paged_attention,
                             plan_attention, plan_rotary_write_kv, rms_norm, rotary_write_kv)
from ropeway.kernels.fp8_kv import cache_views

from .config import ModelConfig
from .errors import ModelLoadError
from .forward_batch import ForwardBatch
from .tensor_parallel import TensorParallel


@dataclass
class DecoderLayer:
    input_norm: torch.Tensor
    qkv_weight: torch.Tensor
    qkv_bias: torch.Tensor | None
    o_weight: torch.Tensor
    post_attention_norm: torch.Tensor
    gate_up_weight: torch.Tensor
    down_weight: torch.Tensor


class ForwardStopped(Exception):
    """A forward pass left between two layers because its caller's keep_going said so: what it
    wrote to the KV cache so far is incomplete."""

    def __init__(self, layers_done: int, num_layers: int):
        super().__init__(f"stopped after {layers_done} of {num_layers} layers")
        self.layers_done = layers_done
        self.num_layers = num_layers


@dataclass
class Capture:
    """Per-layer keys before RoPE, and values, of every token of a forward pass (what landmark
    summaries are made of): copies, for RoPE then rotates k in place."""
    keys: list[torch.Tensor] = field(default_factory=list)
    values: list[torch.Tensor] = field(default_factory=list)

    def add(self, k: torch.Tensor, v: torch.Tensor) -> None:
        self.keys.append(k.clone())
        self.values.append(v.clone())


@dataclass
class QueryCapture:
    """Queries before RoPE of some tokens of a forward pass, every layer (retrieval scores with
    those of a long prompt's chunks). The rotary kernel stores them in its own launch: a
    step of a long prompt paid a gather in each layer. token_rows [T] (int64 on the device):
    token t's row in the buffer, -1 for none; order [R]: the buffer rows wanted, in order
    (a token may be wanted twice)."""
    token_rows: torch.Tensor
    num_rows: int
    order: torch.Tensor
    buffer: torch.Tensor | None = None  # [L, num_rows, H, D], filled by the forward pass

    def queries(self) -> torch.Tensor:
        """[L, R, H, D]: the wanted tokens' queries, in order."""
        return self.buffer.index_select(1, self.order)


class LayerCaches:
    """A KV pool [num_layers, 2, ...] with each layer's (k_cache, k_scale, v_cache, v_scale) views,
    and every layer's keys with their scales (keys), the scales None unless the pool is fp8
    (kernels/fp8_kv.py). The engine makes it once for its pool:
    made per forward pass or cache operation, the views cost an eager step's host ~4 torch ops a
    layer."""

    def __init__(self, kv_cache: torch.Tensor, num_kv_heads: int, head_dim: int):
        self.kv_cache = kv_cache
        self.keys = cache_views(kv_cache[:, 0], num_kv_heads, head_dim)
        self.layers = [(*cache_views(kv_cache[i, 0], num_kv_heads, head_dim),
                        *cache_views(kv_cache[i, 1], num_kv_heads, head_dim)) for i in range(kv_cache.shape[0])]


class LlamaModel:
    def __init__(self, config: ModelConfig, weights: Mapping[str, torch.Tensor], device: torch.device,
                 tp: TensorParallel | None = None):
        """weights: Hugging Face names to full tensors (on any device). tp: this rank's place in
        a tensor-parallel group (None: the whole model here); each rank keeps only its slices
        of the weights (see tensor_parallel.py for the split)."""
        self.config = config
        self.device = device
        self.tp = tp = tp or TensorParallel()
        self.scale = config.head_dim ** -0.5
        heads = tp.split(config.num_heads, "number of attention heads")
        kv_heads = tp.kv_heads(config.num_kv_heads)
        ffn = tp.split(config.intermediate_size, "intermediate (FFN) size")
        self.num_local_heads = heads.stop - heads.start
        self.num_local_kv_heads = kv_heads.stop - kv_heads.start
        self.q_size = self.num_local_heads * config.head_dim
        self.kv_size = self.num_local_kv_heads * config.head_dim
        q_dims = slice(heads.start * config.head_dim, heads.stop * config.head_dim)
        kv_dims = slice(kv_heads.start * config.head_dim, kv_heads.stop * config.head_dim)
        everything = slice(None)

        def tensor(name: str) -> torch.Tensor:
            if name not in weights:
                raise ModelLoadError(f"weights lack tensor {name!r}")
            return weights[name]

        def piece(name: str, rows: slice = everything, columns: slice = everything) -> torch.Tensor:
            """This rank's slice on the device; may be a view of the whole tensor."""
            full = tensor(name)
            return (full[rows] if full.dim() == 1 else full[rows, columns]).to(device)

        def own(t: torch.Tensor) -> torch.Tensor:
            # A view would keep its whole source tensor alive, and with it the other ranks' slices.
            if tp.world_size == 1 or (t.is_contiguous() and t.untyped_storage().nbytes() == t.nbytes):
                return t
            return t.contiguous() if not t.is_contiguous() else t.clone()

        def take(name: str, rows: slice = everything, columns: slice = everything) -> torch.Tensor:
            return own(piece(name, rows, columns))

        def qkv(layer_prefix: str, kind: str) -> torch.Tensor:
            """q, k and v weights (or biases) of this rank's heads, fused (cat copies them)."""
            return torch.cat([piece(f"{layer_prefix}self_attn.{x}_proj.{kind}", rows)
                              for x, rows in (("q", q_dims), ("k", kv_dims), ("v", kv_dims))])

        embed_tokens = tensor("model.embed_tokens.weight")
        if embed_tokens.shape != (config.vocab_size, config.hidden_size):
            raise ModelLoadError(f"embedding shape {tuple(embed_tokens.shape)} does not match "
                                 f"vocab {config.vocab_size} x hidden {config.hidden_size}")
        # Vocab-parallel: [vocab / world_size (padded), hidden] on each rank.
        self.embed_tokens = own(tp.shard_vocab(embed_tokens).to(device))
        self.norm = take("model.norm.weight")
        self.lm_head = (self.embed_tokens if config.tie_word_embeddings or "lm_head.weight" not in weights
                        else own(tp.shard_vocab(tensor("lm_head.weight")).to(device)))
        self.layers = []
        for i in range(config.num_layers):
            p = f"model.layers.{i}."
            has_bias = config.attention_bias and p + "self_attn.q_proj.bias" in weights
            # Column-parallel q/k/v and gate/up (each rank's slices fused), row-parallel o and down.
            self.layers.append(DecoderLayer(
                input_norm=take(p + "input_layernorm.weight"),
                qkv_weight=qkv(p, "weight"),
                qkv_bias=qkv(p, "bias") if has_bias else None,
                o_weight=take(p + "self_attn.o_proj.weight", everything, q_dims),
                post_attention_norm=take(p + "post_attention_layernorm.weight"),
                gate_up_weight=torch.cat([piece(p + "mlp.gate_proj.weight", ffn),
                                          piece(p + "mlp.up_proj.weight", ffn)]),
                down_weight=take(p + "mlp.down_proj.weight", everything, ffn),
            ))

    def pack_linear_weights_for_cpu(self) -> None:
        """Every linear layer's weight in oneDNN's layout (kernels/cpu_linear.py: about twice MKL's
        speed for a CPU decode step); a no-op elsewhere, or if already done. A tied LM head gets a
        packed copy of its own, the embedding staying as it is."""
        for layer in self.layers:
            for name in ("qkv_weight", "o_weight", "gate_up_weight", "down_weight"):
                setattr(layer, name, pack_linear_weight(getattr(layer, name)))
        self.lm_head = pack_linear_weight(self.lm_head)

    @property
    def kv_elements_per_token(self) -> int:
        """Elements of K and V that one token occupies in this rank's cache, over all layers."""
        return 2 * self.config.num_layers * self.num_local_kv_heads * self.config.head_dim

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.dtype

    @torch.inference_mode()
    def forward(self, batch: ForwardBatch, kv_cache: "torch.Tensor | LayerCaches",
                capture: Capture | QueryCapture | None = None,
                keep_going: Callable[[], bool] | None = None) -> torch.Tensor:
        """Logits (fp32) [len(batch.logits_indices), vocab]. kv_cache is
        [num_layers, 2, num_blocks, block_size, num_local_kv_heads, head_dim], or an fp8 pool
        [num_layers, 2, num_blocks, block bytes] (kernels/fp8_kv.py), or its LayerCaches. capture, if given,
        receives each layer's keys before RoPE and values (a Capture), or queries before RoPE of
        some tokens (a QueryCapture), of this rank's heads.
        keep_going, if given, is asked before each layer; False raises ForwardStopped (a long
        prompt chunk on CPU runs for seconds, and nobody may want it any more). Under tensor
        parallelism every rank runs the same batch on its own slice of the cache
        (num_local_kv_heads) and returns the same full-vocabulary logits."""
        cfg, tp = self.config, self.tp
        num_tokens = batch.input_ids.shape[0]
        h = tp.embed(batch.input_ids, self.embed_tokens)
        # The residual stream h is updated in place by the fused add + norm kernels.
        x = rms_norm(h, self.layers[0].input_norm, cfg.rms_norm_eps)
        if not isinstance(kv_cache, LayerCaches):
            kv_cache = LayerCaches(kv_cache, self.num_local_kv_heads, cfg.head_dim)
        caches = kv_cache.layers
        attention_plan = plan_attention(batch.block_tables, batch.seq_lens, batch.query_start_loc,
                                        caches[0][0].shape[1], batch.slot_bias)
        # The CPU's RoPE + KV-write plan (cos/sin, slots) once for all layers; None on CUDA.
        rotary_plan = plan_rotary_write_kv(batch.positions, batch.seq_index, batch.inv_freq, batch.attention_factor,
                                           batch.slot_mapping)
        query_capture = capture if isinstance(capture, QueryCapture) else None
        kept_rows = [(None, None)] * cfg.num_layers
        if query_capture is not None:
            query_capture.buffer = h.new_empty(cfg.num_layers, query_capture.num_rows, self.num_local_heads,
                                               cfg.head_dim)
            kept_rows = [(rows, query_capture.token_rows) for rows in query_capture.buffer.unbind(0)]
        for i, layer in enumerate(self.layers):
            if keep_going is not None and not keep_going():
                raise ForwardStopped(i, len(self.layers))
            qkv = linear(x, layer.qkv_weight, layer.qkv_bias)
            q = qkv[:, : self.q_size].view(num_tokens, self.num_local_heads, cfg.head_dim)
            k = qkv[:, self.q_size : self.q_size + self.kv_size].view(num_tokens, self.num_local_kv_heads, cfg.head_dim)
            v = qkv[:, self.q_size + self.kv_size :].view(num_tokens, self.num_local_kv_heads, cfg.head_dim)
            if isinstance(capture, Capture):
                capture.add(k, v)
            k_cache, k_scale, v_cache, v_scale = caches[i]
            # RoPE on q and k in place, then k and v to their cache slots: one launch on CUDA.
            rotary_write_kv(q, k, v, k_cache, v_cache, batch.slot_mapping, batch.positions,
                            batch.seq_index, batch.inv_freq, batch.attention_factor, k_scale, v_scale,
                            rotary_plan, *kept_rows[i])
            attn = paged_attention(q, k_cache, v_cache, batch.block_tables, batch.seq_lens,
                                   batch.query_start_loc, self.scale, batch.max_query_len, batch.max_seq_len,
                                   batch.slot_bias, batch.num_decode_seqs, batch.long_chunks, attention_plan,
                                   k_scale, v_scale)
            o = tp.all_reduce(linear(attn.reshape(num_tokens, self.q_size), layer.o_weight))
            x = add_rms_norm(o, h, layer.post_attention_norm, cfg.rms_norm_eps)
            mlp = tp.all_reduce(linear(linear_silu_mul(x, layer.gate_up_weight), layer.down_weight))
            if i + 1 < len(self.layers):
                x = add_rms_norm(mlp, h, self.layers[i + 1].input_norm, cfg.rms_norm_eps)
            else:
                h.add_(mlp)
        h = rms_norm(h[batch.logits_indices], self.norm, cfg.rms_norm_eps)
        return tp.gather_vocab(linear(h, self.lm_head), cfg.vocab_size).to(torch.float32)
