"""Load a Llama-family GGUF with the `gguf` package: metadata, tokenizer, dequantized weights."""

from pathlib import Path

import numpy as np
import torch

from .config import ModelConfig
from .errors import ModelLoadError
from .tokenizer import RopewayTokenizer, tokenizer_from_gguf

SUPPORTED_GGUF_ARCHITECTURES = ("llama", "mistral", "qwen2")

_TENSOR_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


def read_gguf(path: Path):
    import gguf

    try:
        return gguf.GGUFReader(str(path))
    except Exception as error:
        raise ModelLoadError(f"{path} is not a readable GGUF file: {error}") from error


def gguf_metadata(reader) -> dict:
    metadata = {}
    for key, field in reader.fields.items():
        try:
            metadata[key] = field.contents()
        except Exception:  # fields of unusual types that no config key uses
            continue
    return metadata


def load_gguf(path: Path, dtype: torch.dtype) -> tuple[ModelConfig, dict[str, torch.Tensor], RopewayTokenizer]:
    from gguf.quants import dequantize

    reader = read_gguf(path)
    metadata = gguf_metadata(reader)
    config = config_from_gguf(metadata, [t.name for t in reader.tensors], path)
    tokenizer = tokenizer_from_gguf(metadata)
    weights = {}
    for tensor in reader.tensors:
        name = hf_tensor_name(tensor.name)
        try:
            array = dequantize(tensor.data, tensor.tensor_type)
        except NotImplementedError as error:
            raise ModelLoadError(f"{path}: tensor {tensor.name} has unsupported type "
                                 f"{tensor.tensor_type.name}") from error
        weight = torch.from_numpy(np.array(array, dtype=np.float32))  # a writable copy
        if config.architecture != "qwen2" and tensor.name.endswith(("attn_q.weight", "attn_k.weight")):
            heads = config.num_heads if ".attn_q." in tensor.name else config.num_kv_heads
            weight = unpermute_rope_rows(weight, heads)
        weights[name] = weight.to(dtype)
    return config, weights, tokenizer


def unpermute_rope_rows(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """llama.cpp's converter interleaves each head's rows for its pairwise RoPE; undo it so
    the half-split (Neox / HF) rotary layout applies."""
    half = weight.shape[0] // num_heads // 2
    return weight.reshape(num_heads, half, 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


def hf_tensor_name(gguf_name: str) -> str:
    parts = gguf_name.split(".")
    if parts[0] == "blk":
        layer, base, suffix = parts[1], parts[2], parts[3]
        if base not in _TENSOR_NAMES:
            raise ModelLoadError(f"unexpected GGUF tensor {gguf_name}")
        return f"model.layers.{layer}.{_TENSOR_NAMES[base]}.{suffix}"
    base, suffix = parts[0], parts[-1]
    if base not in _TENSOR_NAMES:
        raise ModelLoadError(f"unexpected GGUF tensor {gguf_name}")
    return f"{_TENSOR_NAMES[base]}.{suffix}"


def config_from_gguf(metadata: dict, tensor_names: list[str], path: Path) -> ModelConfig:
    arch = metadata.get("general.architecture")
    if arch not in SUPPORTED_GGUF_ARCHITECTURES:
        raise ModelLoadError(f"{path}: GGUF architecture {arch!r} is not supported "
                             f"(supported: {', '.join(SUPPORTED_GGUF_ARCHITECTURES)})")

    def key(name, default=None, required=True):
        value = metadata.get(f"{arch}.{name}", default)
        if value is None and required:
            raise ModelLoadError(f"{path}: GGUF metadata lacks {arch}.{name}")
        return value

    hidden = int(key("embedding_length"))
    heads = int(key("attention.head_count"))
    kv_heads = int(key("attention.head_count_kv", heads))
    head_dim = int(key("attention.key_length", hidden // heads))
    vocab = key("vocab_size", None, required=False)
    if vocab is None:
        vocab = len(metadata.get("tokenizer.ggml.tokens", []))
    rope_scaling = {}
    scaling_type = key("rope.scaling.type", None, required=False)
    if scaling_type and scaling_type != "none":
        rope_scaling = {"rope_type": scaling_type, "factor": float(key("rope.scaling.factor", 1.0))}
        original = key("rope.scaling.original_context_length", None, required=False)
        if original:
            rope_scaling["original_max_position_embeddings"] = int(original)
    return ModelConfig(
        architecture=arch,
        vocab_size=int(vocab),
        hidden_size=hidden,
        num_layers=int(key("block_count")),
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        intermediate_size=int(key("feed_forward_length")),
        rms_norm_eps=float(key("attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(key("rope.freq_base", 10000.0)),
        max_position_embeddings=int(key("context_length", 2048)),
        tie_word_embeddings="output.weight" not in tensor_names,
        attention_bias=arch == "qwen2",
        rope_scaling=rope_scaling,
        name=str(metadata.get("general.name", path.stem)),
    )
