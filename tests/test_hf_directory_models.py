"""Tiny random-weight models saved with transformers' save_pretrained: the safetensors path.

A GQA Llama with its own lm_head, and a Qwen2 with q/k/v bias and tied embeddings, each
compared with transformers on prompt logits and greedy continuations.
"""

import json

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from ropeway import LLM, SamplingParams
from ropeway.models import ModelLoadError
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


def save_tiny_model(directory, kind: str):
    import transformers

    torch.manual_seed({"llama": 1, "qwen2": 2}[kind])
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, max_position_embeddings=256, rms_norm_eps=1e-6,
                  bos_token_id=256, eos_token_id=257, initializer_range=0.2)
    if kind == "llama":
        config = transformers.LlamaConfig(num_key_value_heads=2, rope_theta=10000.0,
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


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def tiny(request, tmp_path_factory):
    directory = tmp_path_factory.mktemp(request.param)
    hf_model = save_tiny_model(directory, request.param)
    llm = LLM(model=str(directory), dtype="float32", kv_cache_memory_bytes=1 << 22)
    return request.param, hf_model, llm


def test_config_read_from_directory(tiny):
    kind, hf_model, llm = tiny
    cfg = llm.engine.model_config
    assert cfg.architecture == kind
    assert cfg.num_kv_heads == hf_model.config.num_key_value_heads
    assert cfg.attention_bias == (kind == "qwen2")
    assert cfg.tie_word_embeddings == (kind == "qwen2")


def test_prompt_logits_match_transformers(tiny):
    _, hf_model, llm = tiny
    ids = llm.tokenizer.encode("The tiny model reads this sentence.")
    assert ids == list("The tiny model reads this sentence.".encode())
    out = llm.generate([ids], SamplingParams(temperature=0, max_tokens=1, logprobs=5))[0].outputs[0]
    with torch.no_grad():
        reference = hf_model(torch.tensor([ids])).logits[0, -1].float().log_softmax(-1)
    top = out.logprobs[0].top
    assert [t for t, _, _ in top] == reference.topk(5).indices.tolist()
    assert torch.allclose(torch.tensor([lp for _, _, lp in top]), reference.topk(5).values, atol=1e-4)


def test_greedy_matches_transformers(tiny):
    _, hf_model, llm = tiny
    prompts = [list(b"Hello there"), list(b"A longer prompt that spans more than one block of sixteen")]
    outputs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=32, ignore_eos=True))
    for ids, output in zip(prompts, outputs):
        with torch.no_grad():
            expected = hf_model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                         max_new_tokens=32, min_new_tokens=32, do_sample=False)[0, len(ids):]
        ours = output.outputs[0].token_ids
        # transformers suppresses EOS for min_new_tokens; we sample it (ignore_eos): compare up to any EOS.
        stop = ours.index(257) if 257 in ours else len(ours)
        assert stop >= 8
        assert ours[:stop] == expected.tolist()[:stop]


def test_chat_template_from_tokenizer_config(tiny):
    _, _, llm = tiny
    text = llm.tokenizer.apply_chat_template([{"role": "user", "content": "hi"}])
    assert text == "<s>user: hi\nassistant:"


def test_unsupported_architecture_is_named(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}))
    with pytest.raises(ModelLoadError, match="GPT2LMHeadModel"):
        LLM(model=str(tmp_path), dtype="float32")


def test_broken_files_are_named(tmp_path):
    broken_gguf = tmp_path / "broken.gguf"
    broken_gguf.write_bytes(b"GGUF\x03\x00\x00\x00 not really")
    with pytest.raises(ModelLoadError, match="broken.gguf"):
        LLM(model=str(broken_gguf), dtype="float32")
    directory = tmp_path / "model"
    directory.mkdir()
    (directory / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="config.json"):
        LLM(model=str(directory), dtype="float32")
    (directory / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "vocab_size": 8}))
    with pytest.raises(ModelLoadError, match="hidden_size"):
        LLM(model=str(directory), dtype="float32")
    with pytest.raises(ModelLoadError, match="does not exist"):
        LLM(model=str(tmp_path / "missing"), dtype="float32")
