"""The default model on our engine against transformers' Llama on the same GGUF."""

import pytest
import torch

from ropeway import SamplingParams
from ropeway.models.forward_batch import ForwardBatch
from ropeway.arith import cdiv
from ropeway.models import rope_inv_freq

pytestmark = pytest.mark.slow  # the reference model: transformers

PLAIN_PROMPTS = [
    "The history of the Roman Empire began",
    "def fibonacci(n):\n",
]
CHATS = [
    [{"role": "user", "content": "Write a long story about a dragon who learns to bake bread."}],
    [{"role": "system", "content": "You are a concise assistant."},
     {"role": "user", "content": "Explain how a paged KV cache works in an inference server."}],
]
TOKENIZER_SAMPLES = [
    "Hello world",
    "  leading spaces and trailing  ",
    "Numbers 1234567 and symbols !@#$%^&*()",
    "Unicode: café, naïve, 東京, emoji 🚀🔥, Ελληνικά",
    "Code:\n\tdef f(x):\n\t\treturn x ** 2  # square\n",
    "<|im_start|>user\nspecial tokens inline<|im_end|>",
    "",
]


def hf_greedy(hf_model, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    with torch.no_grad():
        out = hf_model.generate(torch.tensor([prompt_ids]),
                                attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
                                max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=2)
    return out[0, len(prompt_ids):].tolist()


def hf_chat_ids(hf_tokenizer, messages) -> list[int]:
    ids = hf_tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    if not isinstance(ids, list):
        ids = ids["input_ids"]
    return list(ids)


@pytest.mark.parametrize("text", TOKENIZER_SAMPLES)
def test_tokenization_matches_transformers(default_llm, hf_default, text):
    _, hf_tokenizer = hf_default
    assert default_llm.tokenizer.encode(text) == hf_tokenizer.encode(text, add_special_tokens=True)
    ids = hf_tokenizer.encode(text)
    assert default_llm.tokenizer.decode(ids) == hf_tokenizer.decode(ids, skip_special_tokens=True)


@pytest.mark.parametrize("messages", CHATS)
def test_chat_template_matches_transformers(default_llm, hf_default, messages):
    _, hf_tokenizer = hf_default
    assert default_llm.tokenizer.encode_chat(messages) == hf_chat_ids(hf_tokenizer, messages)


def test_greedy_output_matches_transformers(default_llm, hf_default):
    hf_model, hf_tokenizer = hf_default
    prompts = [default_llm.tokenizer.encode(p) for p in PLAIN_PROMPTS]
    prompts += [hf_chat_ids(hf_tokenizer, m) for m in CHATS]
    outputs = default_llm.generate(prompts, SamplingParams(temperature=0, max_tokens=64))
    compared = 0
    for prompt_ids, output in zip(prompts, outputs):
        expected = hf_greedy(hf_model, prompt_ids, 64)
        assert output.outputs[0].token_ids == expected
        compared += len(expected)
    # Most prompts run the full 64 tokens rather than stopping early at EOS.
    assert compared >= 3 * 64


def test_prompt_logits_match_transformers(default_llm, hf_default):
    hf_model, _ = hf_default
    engine = default_llm.engine
    ids = default_llm.tokenizer.encode("A paged KV cache stores keys and values in fixed-size blocks, so that")
    n = len(ids)
    cfg, block_size = engine.model_config, engine.config.block_size
    # A private cache, with the sequence's blocks in shuffled order: tables need not be sorted.
    table = torch.randperm(cdiv(n, block_size) + 3, generator=torch.Generator().manual_seed(0)).to(torch.int32)
    kv_cache = torch.zeros(cfg.num_layers, 2, len(table), block_size, cfg.num_kv_heads, cfg.head_dim)
    positions = torch.arange(n)
    batch = ForwardBatch(
        input_ids=torch.tensor(ids), positions=positions, seq_index=torch.zeros(n, dtype=torch.int32),
        slot_mapping=table[positions // block_size].long() * block_size + positions % block_size,
        query_start_loc=torch.tensor([0, n], dtype=torch.int32), seq_lens=torch.tensor([n], dtype=torch.int32),
        block_tables=table[None], inv_freq=rope_inv_freq(engine.default_rope_plan)[None],
        attention_factor=torch.ones(1), logits_indices=torch.arange(n), max_query_len=n, max_seq_len=n,
    )
    ours = engine.model.forward(batch, kv_cache)
    with torch.no_grad():
        theirs = hf_model(torch.tensor([ids])).logits[0].float()
    assert torch.allclose(ours, theirs, atol=2e-3, rtol=1e-4), (ours - theirs).abs().max()
    assert (ours.argmax(-1) == theirs.argmax(-1)).all()


def test_prompt_logprobs_under_chunked_prefill_match_transformers(make_llm, hf_default):
    hf_model, _ = hf_default
    llm = make_llm(prefill_chunk_size=16, max_num_batched_tokens=48, max_num_seqs=8)
    ids = llm.tokenizer.encode("Prompt logprobs score every prompt token given the ones before it, "
                               "which is what a perplexity evaluation over a long stream needs.")
    out = llm.generate([ids], SamplingParams(temperature=0, max_tokens=2, prompt_logprobs=True))[0]
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(ids)
    with torch.no_grad():
        reference = hf_model(torch.tensor([ids])).logits[0].float().log_softmax(-1)
    expected = reference[:-1].gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
    assert torch.allclose(torch.tensor(out.prompt_logprobs[1:]), expected, atol=1e-3)


def test_decodes_after_long_prompts_match_transformers(make_llm, hf_default, monkeypatch):
    """Decodes at contexts long enough for attention in pieces read in place (cpu_long_decode.py),
    in one batch with a prefix-cache hit: transformers' greedy tokens."""
    from ropeway.kernels import cpu_attention, cpu_long_decode

    long_decodes = []
    attention = cpu_attention.long_decode_attention
    monkeypatch.setattr(cpu_attention, "long_decode_attention",
                        lambda *args: long_decodes.append(args[2]) or attention(*args))
    hf_model, _ = hf_default
    llm = make_llm(enable_prefix_caching=True)
    inventory = " ".join(f"Shelf {i} holds {3 * i + 1} jars of {fruit} jam."
                         for i, fruit in zip(range(100), ["plum", "fig", "cherry", "quince"] * 25))
    first = llm.tokenizer.encode(inventory + " The shelf with the most jars is shelf")
    llm.generate([first], SamplingParams(temperature=0, max_tokens=1))  # its prefix, cached
    prompts = [llm.tokenizer.encode(inventory + " The fig jam stands on shelves"),
               llm.tokenizer.encode("Recipe notes. " + inventory[: len(inventory) * 3 // 4] + " Next,")]
    assert min(len(ids) for ids in prompts) > cpu_long_decode.LONG_DECODE_KEYS
    hits = llm.engine.block_manager.prefix_hits
    outputs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=24))
    assert llm.engine.block_manager.prefix_hits > hits
    # Both sequences' first pieces were read in place: the cached prefix's blocks and the
    # other prompt's fresh ones each lie in one run.
    assert {decode.row for decode in long_decodes} == {0, 1}
    assert all(decode.calls[0].start is not None for decode in long_decodes)
    for ids, output in zip(prompts, outputs):
        assert output.outputs[0].token_ids == hf_greedy(hf_model, ids, 24)
