"""Load a Hugging Face model directory of the Llama family (config.json, *.safetensors, tokenizer)."""

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from .config import ModelConfig
from .errors import ModelLoadError
from .tokenizer import RopewayTokenizer, tokenizer_from_hf_dir

SUPPORTED_HF_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
}


def load_hf_dir(directory: Path, dtype: torch.dtype) -> tuple[ModelConfig, dict[str, torch.Tensor], RopewayTokenizer]:
    config_file = directory / "config.json"
    if not config_file.is_file():
        raise ModelLoadError(f"{directory} has no config.json")
    try:
        raw = json.loads(config_file.read_text())
    except json.JSONDecodeError as error:
        raise ModelLoadError(f"{config_file} is not valid JSON: {error}") from error
    config = config_from_hf(raw, directory)
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"{directory} has no *.safetensors weights")
    weights = {}
    for file in files:
        try:
            weights.update(load_file(str(file)))
        except (SafetensorError, OSError, ValueError) as error:
            raise ModelLoadError(f"{file} is not a valid safetensors file: {error}") from error
    weights = {name: tensor.to(dtype) for name, tensor in weights.items()}
    return config, weights, tokenizer_from_hf_dir(directory, raw)


def config_from_hf(raw: dict, directory: Path) -> ModelConfig:
    architectures = raw.get("architectures") or []
    arch = next((SUPPORTED_HF_ARCHITECTURES[a] for a in architectures if a in SUPPORTED_HF_ARCHITECTURES), None)
    if arch is None:
        raise ModelLoadError(
            f"{directory}: architecture {architectures or raw.get('model_type')!r} is not supported "
            f"(supported: {', '.join(SUPPORTED_HF_ARCHITECTURES)})"
        )
    try:
        hidden = int(raw["hidden_size"])
        heads = int(raw["num_attention_heads"])
        head_dim = raw.get("head_dim") or hidden // heads
        # transformers 5 writes `rope_parameters` (with rope_theta inside); older files
        # write `rope_theta` and `rope_scaling` at the top level.
        rope = dict(raw.get("rope_parameters") or raw.get("rope_scaling") or {})
        rope_theta = float(rope.pop("rope_theta", raw.get("rope_theta", 10000.0)))
        if rope.get("type") and not rope.get("rope_type"):
            rope["rope_type"] = rope.pop("type")
        if rope.get("rope_type") == "default":
            rope = {}
        return ModelConfig(
            architecture=arch,
            vocab_size=int(raw["vocab_size"]),
            hidden_size=hidden,
            num_layers=int(raw["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(raw.get("num_key_value_heads") or heads),
            head_dim=int(head_dim),
            intermediate_size=int(raw["intermediate_size"]),
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            rope_theta=rope_theta,
            max_position_embeddings=int(raw.get("max_position_embeddings", 2048)),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            attention_bias=arch == "qwen2" or bool(raw.get("attention_bias", False)),
            rope_scaling=rope,
            name=directory.name,
        )
    except KeyError as error:
        raise ModelLoadError(f"{directory}/config.json lacks {error.args[0]!r}") from error
