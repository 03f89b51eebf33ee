"""Tiny random-weight models saved with transformers' save_pretrained: the safetensors path.

A GQA Llama with its own lm_head, and a Qwen2 with q/k/v bias and tied embeddings, each
compared with transformers on prompt logits and greedy continuations.
"""

import json

import pytest
import torch
from tiny_models import save_tiny_model

from ropeway import LLM, SamplingParams
from ropeway.models import ModelLoadError

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
    assert ids == list(b"The tiny model reads this sentence.")
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
