"""Llama-3-8B- and 70B-shaped models with random bf16 weights, built in memory (nothing downloaded)."""

import zlib
from collections.abc import Mapping

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from ropeway import EngineConfig
from ropeway.engine import LLMEngine, LoadedModel
from ropeway.models import LlamaModel, ModelConfig, RopewayTokenizer
from ropeway.models.tokenizer import byte_level_alphabet

LLAMA3_8B = ModelConfig(
    architecture="llama", vocab_size=128256, hidden_size=4096, num_layers=32, num_heads=32,
    num_kv_heads=8, head_dim=128, intermediate_size=14336, rms_norm_eps=1e-5, rope_theta=500000.0,
    max_position_embeddings=131072, tie_word_embeddings=False, name="random-llama3-8b",
)
LLAMA3_70B = ModelConfig(
    architecture="llama", vocab_size=128256, hidden_size=8192, num_layers=80, num_heads=64,
    num_kv_heads=8, head_dim=128, intermediate_size=28672, rms_norm_eps=1e-5, rope_theta=500000.0,
    max_position_embeddings=131072, tie_word_embeddings=False, name="random-llama3-70b",
)


def byte_tokenizer() -> RopewayTokenizer:
    """Bytes only: enough to run the engine on models whose real tokenizer we do not have."""
    vocab = {char: byte for byte, char in byte_level_alphabet().items()}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    return RopewayTokenizer(tokenizer, bos_token_id=None, eos_token_ids=[], add_bos=False, chat_template=None)


def full_vocab_tokenizer(vocab_size: int) -> RopewayTokenizer:
    """Bytes plus one plain-text word per remaining id, so that every token a random model
    samples decodes to text (a streamed completion then sends one chunk per token)."""
    vocab = {char: byte for byte, char in byte_level_alphabet().items()}
    vocab.update({f"w{i} ": i for i in range(len(vocab), vocab_size)})
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    return RopewayTokenizer(tokenizer, bos_token_id=None, eos_token_ids=[], add_bos=False, chat_template=None)


class RandomWeights(Mapping):
    """Random weights under Hugging Face names, each made on the device when it is read (the
    same values every time, on every rank): a tensor-parallel rank slices what it reads and
    drops the rest, so no process ever holds the whole of a model larger than one GPU."""

    def __init__(self, config: ModelConfig, dtype: torch.dtype, device: torch.device):
        self.dtype, self.device = dtype, device
        h, q, kv, i = (config.hidden_size, config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim,
                       config.intermediate_size)
        self.shapes = {"model.embed_tokens.weight": (config.vocab_size, h), "lm_head.weight": (config.vocab_size, h),
                       "model.norm.weight": (h,)}
        for layer in range(config.num_layers):
            p = f"model.layers.{layer}."
            self.shapes.update({
                p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
                p + "self_attn.q_proj.weight": (q, h), p + "self_attn.k_proj.weight": (kv, h),
                p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, q),
                p + "mlp.gate_proj.weight": (i, h), p + "mlp.up_proj.weight": (i, h),
                p + "mlp.down_proj.weight": (h, i),
            })

    def __getitem__(self, name: str) -> torch.Tensor:
        shape = self.shapes[name]
        if len(shape) == 1:  # norm weights
            return torch.ones(shape, dtype=self.dtype, device=self.device)
        generator = torch.Generator(device=self.device).manual_seed(zlib.crc32(name.encode()))
        return (torch.randn(shape, generator=generator, device=self.device) * 0.02).to(self.dtype)

    def __contains__(self, name) -> bool:  # Mapping's default would make the tensor to find out
        return name in self.shapes

    def __iter__(self):
        return iter(self.shapes)

    def __len__(self) -> int:
        return len(self.shapes)


def load_random_model(config: ModelConfig, dtype: torch.dtype, device: torch.device,
                      tokenizer: RopewayTokenizer | None = None) -> LoadedModel:
    model = LlamaModel(config, RandomWeights(config, dtype, device), device)
    return LoadedModel(model, tokenizer or byte_tokenizer(), 0.0)


def build_engine(config: EngineConfig, random_llama3_8b: bool, tokenizer: RopewayTokenizer | None = None) -> LLMEngine:
    """An LLMEngine on config's model, or, with random_llama3_8b, on the random-weight Llama-3-8B shape."""
    loaded = None
    if random_llama3_8b:
        device = config.torch_device()
        loaded = load_random_model(LLAMA3_8B, config.torch_dtype(device), device, tokenizer)
    return LLMEngine(config, loaded=loaded)
