"""A Llama-3-8B-shaped model with random bf16 weights, built in memory (nothing downloaded)."""

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


def random_weights(config: ModelConfig, dtype: torch.dtype, device: torch.device) -> dict[str, torch.Tensor]:
    generator = torch.Generator(device=device).manual_seed(0)

    def w(*shape, std=0.02):
        return (torch.randn(*shape, generator=generator, device=device, dtype=torch.float32) * std).to(dtype)

    h, kv, i = config.hidden_size, config.num_kv_heads * config.head_dim, config.intermediate_size
    weights = {"model.embed_tokens.weight": w(config.vocab_size, h), "lm_head.weight": w(config.vocab_size, h),
               "model.norm.weight": torch.ones(h, dtype=dtype, device=device)}
    for layer in range(config.num_layers):
        p = f"model.layers.{layer}."
        weights.update({
            p + "input_layernorm.weight": torch.ones(h, dtype=dtype, device=device),
            p + "post_attention_layernorm.weight": torch.ones(h, dtype=dtype, device=device),
            p + "self_attn.q_proj.weight": w(config.num_heads * config.head_dim, h),
            p + "self_attn.k_proj.weight": w(kv, h),
            p + "self_attn.v_proj.weight": w(kv, h),
            p + "self_attn.o_proj.weight": w(h, config.num_heads * config.head_dim),
            p + "mlp.gate_proj.weight": w(i, h),
            p + "mlp.up_proj.weight": w(i, h),
            p + "mlp.down_proj.weight": w(h, i),
        })
    return weights


def load_random_model(config: ModelConfig, dtype: torch.dtype, device: torch.device,
                      tokenizer: RopewayTokenizer | None = None) -> LoadedModel:
    weights = random_weights(config, dtype, device)
    model = LlamaModel(config, weights, device)
    del weights
    return LoadedModel(model, tokenizer or byte_tokenizer(), 0.0)


def build_engine(config: EngineConfig, random_llama3_8b: bool, tokenizer: RopewayTokenizer | None = None) -> LLMEngine:
    """An LLMEngine on config's model, or, with random_llama3_8b, on the random-weight Llama-3-8B shape."""
    loaded = None
    if random_llama3_8b:
        device = config.torch_device()
        loaded = load_random_model(LLAMA3_8B, config.torch_dtype(device), device, tokenizer)
    return LLMEngine(config, loaded=loaded)
