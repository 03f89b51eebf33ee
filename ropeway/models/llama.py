"""Llama-family decoder (Llama 2/3, Mistral, Qwen2, SmolLM) over a flat batch and a paged cache.

q/k/v and gate/up projections are fused into one matrix each at load time: one GEMM
instead of three (two) per layer.
"""

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ropeway.kernels import add_rms_norm_linear, linear, paged_attention, rotary_write_kv

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
        eps = cfg.rms_norm_eps
        # Each norm goes with the projection it feeds, and adds the delta (the previous
        # attention or MLP output) into the residual stream h first. That add may write a new
        # tensor instead of updating h in place (see add_rms_norm_linear), so h is always
        # the one returned.
        delta = None
        for i, layer in enumerate(self.layers):
            qkv, h = add_rms_norm_linear(delta, h, layer.input_norm, eps, layer.qkv_weight, layer.qkv_bias)
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
                                   batch.slot_bias, batch.num_decode_seqs, batch.long_chunks)
            o = linear(attn.reshape(num_tokens, self.q_size), layer.o_weight)
            activation, h = add_rms_norm_linear(o, h, layer.post_attention_norm, eps, layer.gate_up_weight,
                                                silu_mul=True)
            delta = linear(activation, layer.down_weight)
        # Only the sampled rows reach the final norm and lm_head. In a one-token step the one
        # index can only be row 0: no gather, and the last add fuses into lm_head's norm too.
        if not (num_tokens == 1 and batch.logits_indices.shape[0] == 1):
            h, delta = h[batch.logits_indices], delta[batch.logits_indices]
        logits, _ = add_rms_norm_linear(delta, h, self.norm, eps, self.lm_head)
        return logits.to(torch.float32)
