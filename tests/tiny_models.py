"""Tiny random-weight Llama-family models saved with transformers' save_pretrained."""

import json

import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from ropeway.models.tokenizer import byte_level_alphabet

VOCAB = 256 + 2  # every byte, plus two specials


def write_byte_tokenizer(directory) -> None:
    vocab = {char: byte for byte, char in byte_level_alphabet().items()}
    vocab.update({"<s>": 256, "</s>": 257})
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<s>", "eos_token": "</s>",
        "chat_template": "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                         "{% if add_generation_prompt %}assistant:{% endif %}",
    }))


def save_tiny_model(directory, kind: str, max_position_embeddings: int = 256, rope_parameters: dict | None = None):
    """A 2-layer random model saved with save_pretrained, plus a byte tokenizer; returns the HF model."""
    torch.manual_seed({"llama": 1, "qwen2": 2}[kind])
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, max_position_embeddings=max_position_embeddings, rms_norm_eps=1e-6,
                  bos_token_id=256, eos_token_id=257, initializer_range=0.2)
    if kind == "llama":
        rope = rope_parameters or {"rope_type": "default", "rope_theta": 10000.0}
        config = transformers.LlamaConfig(num_key_value_heads=2, rope_parameters=dict(rope),
                                          tie_word_embeddings=False, **common)
        model = transformers.LlamaForCausalLM(config)
    else:
        config = transformers.Qwen2Config(num_key_value_heads=1, rope_theta=50000.0,
                                          tie_word_embeddings=True, **common)
        model = transformers.Qwen2ForCausalLM(config)
        with torch.no_grad():  # random biases, so a loader that dropped them would show
            for layer in model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.normal_(0, 0.5)
    model.eval()
    model.save_pretrained(directory)
    write_byte_tokenizer(directory)
    return model


