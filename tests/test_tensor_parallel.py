"""Tensor parallelism at the model level: TP ranks (gloo, one process each) against the same
model at world size 1, token for token and logit for logit, over paged prefill and decode."""

import pytest
import torch
import torch.distributed as dist
from tensor_parallel_ranks import greedy_paged_run, random_llama_weights, run_tensor_parallel, weight_elements

from ropeway.engine.kv_pool import allocate_kv_cache, plan_kv_pool
from ropeway.models import LlamaModel, ModelConfig, TensorParallel, load_model_files

# 8 query / 2 KV heads: TP=2 splits the KV heads, TP=4 replicates each on two ranks. A vocab
# of 258 does not divide by 4, so TP=4 pads the vocab shards.
TINY = ModelConfig(architecture="llama", vocab_size=258, hidden_size=64, num_layers=2, num_heads=8, num_kv_heads=2,
                   head_dim=16, intermediate_size=96, rms_norm_eps=1e-6, rope_theta=10000.0,
                   max_position_embeddings=256, tie_word_embeddings=False, attention_bias=True, name="tiny-tp")
TINY_PROMPTS = [[5, 17, 200, 3, 99, 42, 7, 250, 11, 64, 128, 1, 9, 77, 31, 2, 180, 56, 23, 140, 8, 33],
                [100, 4, 61, 257, 12, 90, 45]]
DECODE_STEPS = 6
CPU = torch.device("cpu")


def reference_run(config, weights, prompts, first_chunk, device=CPU):
    assert not dist.is_initialized()  # world size 1 makes no collective call, so needs no group
    return greedy_paged_run(LlamaModel(config, weights, device), prompts, first_chunk, DECODE_STEPS)


@pytest.fixture(scope="module")
def tiny_weights():
    return random_llama_weights(TINY, seed=3)


@pytest.mark.slow
@pytest.mark.parametrize("world_size,local_heads", [(2, (4, 1)), (4, (2, 1))])
def test_tiny_llama_tensor_parallel_matches_world_size_1(tmp_path, tiny_weights, world_size, local_heads):
    logits, generated = reference_run(TINY, tiny_weights, TINY_PROMPTS, first_chunk=13)
    ranks = run_tensor_parallel(world_size, tmp_path / f"tp{world_size}", TINY, tiny_weights, TINY_PROMPTS,
                                first_chunk=13, decode_steps=DECODE_STEPS)
    # The first prompt samples from step 2 on, the second from step 1.
    assert [len(tokens) for tokens in generated] == [DECODE_STEPS + 1, DECODE_STEPS + 2]
    for rank in ranks:
        assert rank["local_heads"] == local_heads
        assert rank["generated"] == generated
        torch.testing.assert_close(rank["logits"], logits, atol=2e-5, rtol=1e-5)
    # Each rank holds about 1/N of the weights (norms and, at TP=4, KV heads are replicated).
    assert ranks[0]["weight_elements"] < 1.3 * weight_elements(LlamaModel(TINY, tiny_weights, CPU)) / world_size


@pytest.mark.slow
def test_default_model_tensor_parallel_3_matches_world_size_1(tmp_path):
    config, weights, tokenizer = load_model_files(None, torch.float32)
    assert (config.num_heads, config.num_kv_heads, config.tie_word_embeddings) == (9, 3, True)
    prompts = [tokenizer.encode("The history of the Roman Empire began when"), tokenizer.encode("def fibonacci(n):\n")]
    logits, generated = reference_run(config, weights, prompts, first_chunk=5)
    ranks = run_tensor_parallel(3, tmp_path / "tp3", config, weights, prompts, first_chunk=5,
                                decode_steps=DECODE_STEPS)
    for rank in ranks:
        assert rank["local_heads"] == (3, 1)
        assert rank["generated"] == generated
        torch.testing.assert_close(rank["logits"], logits, atol=1e-4, rtol=1e-4)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_tensor_parallel_2_over_nccl_with_cuda_graphs_matches_world_size_1(tmp_path, tiny_weights):
    """Rank r on GPU r; the decode steps replay CUDA graphs with the collectives captured in them."""
    logits, generated = reference_run(TINY, tiny_weights, TINY_PROMPTS, 13, torch.device("cuda", 0))
    ranks = run_tensor_parallel(2, tmp_path / "nccl", TINY, tiny_weights, TINY_PROMPTS, first_chunk=13,
                                decode_steps=DECODE_STEPS, cuda=True)
    for rank in ranks:
        assert rank["generated"] == generated
        torch.testing.assert_close(rank["logits"], logits, atol=1e-4, rtol=1e-4)


def test_shards_are_slices_that_own_their_memory(tiny_weights):
    """Built as rank 1 of 2 (construction needs no process group): every weight is the right
    slice of the full one, in storage of its own, so the full tensors can be freed."""
    shard = LlamaModel(TINY, tiny_weights, CPU, TensorParallel(rank=1, world_size=2))
    d, layer, full = TINY.head_dim, shard.layers[0], "model.layers.0."
    q, k, v = (tiny_weights[f"{full}self_attn.{x}_proj.weight"] for x in "qkv")
    torch.testing.assert_close(layer.qkv_weight, torch.cat([q[4 * d:], k[d:], v[d:]]), rtol=0, atol=0)
    torch.testing.assert_close(layer.o_weight, tiny_weights[full + "self_attn.o_proj.weight"][:, 4 * d:],
                               rtol=0, atol=0)
    gate, up = tiny_weights[full + "mlp.gate_proj.weight"], tiny_weights[full + "mlp.up_proj.weight"]
    torch.testing.assert_close(layer.gate_up_weight, torch.cat([gate[48:], up[48:]]), rtol=0, atol=0)
    torch.testing.assert_close(layer.down_weight, tiny_weights[full + "mlp.down_proj.weight"][:, 48:], rtol=0, atol=0)
    torch.testing.assert_close(shard.embed_tokens, tiny_weights["model.embed_tokens.weight"][129:], rtol=0, atol=0)
    torch.testing.assert_close(shard.lm_head, tiny_weights["lm_head.weight"][129:], rtol=0, atol=0)
    q_bias, k_bias, v_bias = (tiny_weights[f"{full}self_attn.{x}_proj.bias"] for x in "qkv")
    torch.testing.assert_close(layer.qkv_bias, torch.cat([q_bias[4 * d:], k_bias[d:], v_bias[d:]]), rtol=0, atol=0)
    for t in [shard.embed_tokens, shard.lm_head, *vars(layer).values()]:
        assert t.is_contiguous() and t.untyped_storage().nbytes() == t.nbytes


@pytest.mark.parametrize("world_size,kv_heads_per_rank", [(1, 2), (2, 1), (4, 1)])
def test_kv_pool_holds_the_ranks_kv_heads_only(tiny_weights, world_size, kv_heads_per_rank):
    model = LlamaModel(TINY, tiny_weights, CPU, TensorParallel(rank=world_size - 1, world_size=world_size))
    budget = 1 << 20
    shape = plan_kv_pool(model, torch.float32, CPU, 16, budget, 0.9)
    bytes_per_token = 2 * TINY.num_layers * kv_heads_per_rank * TINY.head_dim * 4
    assert shape.num_blocks == budget // (16 * bytes_per_token)
    cache = allocate_kv_cache(model, shape, torch.float32, CPU)
    assert cache.shape == (TINY.num_layers, 2, shape.num_blocks, 16, kv_heads_per_rank, TINY.head_dim)


@pytest.mark.parametrize("heads,kv_heads,ffn,world_size,message", [
    (9, 3, 1536, 2, "number of attention heads (9)"),
    (6, 3, 96, 2, "number of KV heads (3)"),
    (8, 2, 100, 8, "intermediate (FFN) size (100)"),
    (12, 4, 96, 6, "multiple of the model's number of KV heads (4)"),
])
def test_unsupported_splits_are_refused_naming_the_flag(heads, kv_heads, ffn, world_size, message):
    config = ModelConfig(architecture="llama", vocab_size=258, hidden_size=64, num_layers=1, num_heads=heads,
                         num_kv_heads=kv_heads, head_dim=16, intermediate_size=ffn, rms_norm_eps=1e-6,
                         rope_theta=1e4, max_position_embeddings=64, tie_word_embeddings=True)
    with pytest.raises(ValueError, match=r"--tensor-parallel-size") as error:
        LlamaModel(config, {}, CPU, TensorParallel(rank=0, world_size=world_size))
    assert message in str(error.value)
