"""Llama-family decoder (Llama 2/3, Mistral, Qwen2, SmolLM) over a flat batch and a paged cache.

q/k/v and gate/up projections are fused into one matrix each at load time: one GEMM
instead of three (two) per layer.
"""

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ropeway.kernels import (add_rms_norm, linear, linear_silu_mul, paged_attention, plan_attention, rms_norm,
                             rotary_write_kv)

from .config import ModelConfig
from .errors import ModelLoadError
from .forward_batch import ForwardBatch


@dataclass
class DecoderLayer:
    input_norm: torch.Tensor
    qkv_weight: torch.Tensor
    qkv_bias: torch.Tensor | None
    o_weight: torch.Tensor
    post_attention_norm: torch.Tensor
    gate_up_weight: torch.Tensor
    down_weight: torch.Tensor


@dataclass
class Capture:
    """Per-layer projections before RoPE that a caller wants from a forward pass: landmark
    summaries take keys and values, retrieval scoring takes queries. rows picks tokens
    (None: all)."""
    rows: torch.Tensor | None = None
    queries: list[torch.Tensor] = field(default_factory=list)
    keys: list[torch.Tensor] = field(default_factory=list)
    values: list[torch.Tensor] = field(default_factory=list)

    def add(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        rows = slice(None) if self.rows is None else self.rows
        self.queries.append(q[rows].clone())
        self.keys.append(k[rows].clone())
        self.values.append(v[rows].clone())


class LlamaModel:
    def __init__(self, config: ModelConfig, weights: dict[str, torch.Tensor], device: torch.device):
        self.config = config
        self.device = device
        self.scale = config.head_dim ** -0.5
        self.q_size = config.num_heads * config.head_dim
        self.kv_size = config.num_kv_heads * config.head_dim

        def take(name: str) -> torch.Tensor:
            if name not in weights:
                raise ModelLoadError(f"weights lack tensor {name!r}")
            return weights[name].to(device)

        self.embed_tokens = take("model.embed_tokens.weight")
        if self.embed_tokens.shape != (config.vocab_size, config.hidden_size):
            raise ModelLoadError(f"embedding shape {tuple(self.embed_tokens.shape)} does not match "
                                 f"vocab {config.vocab_size} x hidden {config.hidden_size}")
        self.norm = take("model.norm.weight")
        self.lm_head = (self.embed_tokens if config.tie_word_embeddings or "lm_head.weight" not in weights
                        else take("lm_head.weight"))
        self.layers = []
        for i in range(config.num_layers):
            p = f"model.layers.{i}."
            bias = None
            if config.attention_bias and p + "self_attn.q_proj.bias" in weights:
                bias = torch.cat([take(p + f"self_attn.{x}_proj.bias") for x in "qkv"])
            self.layers.append(DecoderLayer(
                input_norm=take(p + "input_layernorm.weight"),
                qkv_weight=torch.cat([take(p + f"self_attn.{x}_proj.weight") for x in "qkv"]),
                qkv_bias=bias,
                o_weight=take(p + "self_attn.o_proj.weight"),
                post_attention_norm=take(p + "post_attention_layernorm.weight"),
                gate_up_weight=torch.cat([take(p + "mlp.gate_proj.weight"), take(p + "mlp.up_proj.weight")]),
                down_weight=take(p + "mlp.down_proj.weight"),
            ))

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.dtype

    @torch.inference_mode()
    def forward(self, batch: ForwardBatch, kv_cache: torch.Tensor,
                capture: Capture | None = None) -> torch.Tensor:
        """Logits (fp32) [len(batch.logits_indices), vocab]. kv_cache is
        [num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim]. capture, if given,
        receives each layer's queries and keys before RoPE, and values."""
        cfg = self.config
        num_tokens = batch.input_ids.shape[0]
        h = F.embedding(batch.input_ids, self.embed_tokens)
        # The residual stream h is updated in place by the fused add + norm kernels.
        x = rms_norm(h, self.layers[0].input_norm, cfg.rms_norm_eps)
        attention_plan = plan_attention(batch.block_tables, batch.seq_lens, batch.query_start_loc,
                                        kv_cache.shape[3], batch.slot_bias)
        for i, layer in enumerate(self.layers):
            qkv = linear(x, layer.qkv_weight, layer.qkv_bias)
            q = qkv[:, : self.q_size].view(num_tokens, cfg.num_heads, cfg.head_dim)
            k = qkv[:, self.q_size : self.q_size + self.kv_size].view(num_tokens, cfg.num_kv_heads, cfg.head_dim)
            v = qkv[:, self.q_size + self.kv_size :].view(num_tokens, cfg.num_kv_heads, cfg.head_dim)
            if capture is not None:
                capture.add(q, k, v)
            k_cache, v_cache = kv_cache[i, 0], kv_cache[i, 1]
            # RoPE on q and k in place, then k and v to their cache slots: one launch on CUDA.
            rotary_write_kv(q, k, v, k_cache, v_cache, batch.slot_mapping, batch.positions,
                            batch.seq_index, batch.inv_freq, batch.attention_factor)
            attn = paged_attention(q, k_cache, v_cache, batch.block_tables, batch.seq_lens,
                                   batch.query_start_loc, self.scale, batch.max_query_len, batch.max_seq_len,
                                   batch.slot_bias, batch.num_decode_seqs, batch.long_chunks, attention_plan)
            x = add_rms_norm(linear(attn.reshape(num_tokens, self.q_size), layer.o_weight), h,
                             layer.post_attention_norm, cfg.rms_norm_eps)
            mlp = linear(linear_silu_mul(x, layer.gate_up_weight), layer.down_weight)
            if i + 1 < len(self.layers):
                x = add_rms_norm(mlp, h, self.layers[i + 1].input_norm, cfg.rms_norm_eps)
            else:
                h.add_(mlp)
        h = rms_norm(h[batch.logits_indices], self.norm, cfg.rms_norm_eps)
        return linear(h, self.lm_head).to(torch.float32)
