"""Tensor-parallel ranks for the tests: N processes (gloo on CPU, NCCL with one GPU each), each
building its shard of a model and running the same paged forward passes, as the engine's
workers will."""

from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ropeway.arith import cdiv
from ropeway.models import ForwardBatch, LlamaModel, ModelConfig, TensorParallel

# Small pages scatter short prompts over many blocks; Triton on a GPU wants pages of 16+.
CPU_BLOCK_SIZE, GPU_BLOCK_SIZE = 4, 16


def random_llama_weights(config: ModelConfig, seed: int) -> dict[str, torch.Tensor]:
    """fp32 weights under Hugging Face names, large enough that greedy choices are clear-cut."""
    generator = torch.Generator().manual_seed(seed)

    def w(*shape, std=0.2):
        return torch.randn(*shape, generator=generator) * std

    h, q, kv, i = (config.hidden_size, config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim,
                   config.intermediate_size)
    weights = {"model.embed_tokens.weight": w(config.vocab_size, h, std=1.0), "model.norm.weight": 1 + w(h, std=0.1)}
    if not config.tie_word_embeddings:
        weights["lm_head.weight"] = w(config.vocab_size, h)
    for layer in range(config.num_layers):
        p = f"model.layers.{layer}."
        weights.update({
            p + "input_layernorm.weight": 1 + w(h, std=0.1), p + "post_attention_layernorm.weight": 1 + w(h, std=0.1),
            p + "self_attn.q_proj.weight": w(q, h), p + "self_attn.k_proj.weight": w(kv, h),
            p + "self_attn.v_proj.weight": w(kv, h), p + "self_attn.o_proj.weight": w(h, q),
            p + "mlp.gate_proj.weight": w(i, h), p + "mlp.up_proj.weight": w(i, h), p + "mlp.down_proj.weight": w(h, i),
        })
        if config.attention_bias:
            weights.update({p + "self_attn.q_proj.bias": w(q, std=0.5), p + "self_attn.k_proj.bias": w(kv, std=0.5),
                            p + "self_attn.v_proj.bias": w(kv, std=0.5)})
    return weights


def greedy_paged_run(model: LlamaModel, prompts: list[list[int]], first_chunk: int, decode_steps: int,
                     graphs: bool = False) -> tuple[torch.Tensor, list[list[int]]]:
    """Step 1 prefills the first prompt's first `first_chunk` tokens and every other prompt
    whole; step 2 the rest of the first prompt while the others decode; then decode_steps
    steps decode every sequence. Each sequence's blocks are scattered over one shared paged
    cache of the model's local KV heads. Greedy tokens are fed back. With graphs (CUDA), the
    pure-decode steps replay the engine's decode CUDA graphs. Returns the logits of every
    sampled row, step after step, and each sequence's generated tokens."""
    cfg, device = model.config, model.device
    block_size = GPU_BLOCK_SIZE if device.type == "cuda" else CPU_BLOCK_SIZE
    blocks_per_seq = cdiv(max(map(len, prompts)) + decode_steps + 2, block_size)
    num_blocks = blocks_per_seq * len(prompts)
    cache = torch.zeros(cfg.num_layers, 2, num_blocks, block_size, model.num_local_kv_heads, cfg.head_dim,
                        dtype=model.dtype, device=device)
    decode_graphs = None
    if graphs:
        from ropeway.engine.cuda_graphs import DecodeGraphs  # the engine package: only where it is used

        decode_graphs = DecodeGraphs(model, cache, block_size, torch.zeros(num_blocks, block_size, device=device))
    tables = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(0)).view(len(prompts), -1)
    inv_freq = 1.0 / cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2, dtype=torch.float32) / cfg.head_dim)
    tokens = [list(p) for p in prompts]
    cached = [0] * len(prompts)
    generated: list[list[int]] = [[] for _ in prompts]
    all_logits = []
    chunk_plan = [[first_chunk] + [None] * (len(prompts) - 1), [None] * len(prompts)]
    chunk_plan += [[None] * len(prompts)] * decode_steps
    for limits in chunk_plan:
        ids, positions, seq_index, slots, starts, seq_lens, sampled = [], [], [], [], [0], [], []
        for s, limit in enumerate(limits):
            new = tokens[s][cached[s]:] if limit is None else tokens[s][cached[s]: cached[s] + limit]
            span = torch.arange(cached[s], cached[s] + len(new))
            ids += new
            positions.append(span)
            seq_index += [s] * len(new)
            slots.append(tables[s][span // block_size] * block_size + span % block_size)
            starts.append(starts[-1] + len(new))
            cached[s] += len(new)
            seq_lens.append(cached[s])
            if cached[s] == len(tokens[s]):
                sampled.append(s)
        batch = ForwardBatch(
            input_ids=torch.tensor(ids), positions=torch.cat(positions), seq_index=torch.tensor(seq_index),
            slot_mapping=torch.cat(slots), query_start_loc=torch.tensor(starts, dtype=torch.int32),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32), block_tables=tables.to(torch.int32),
            inv_freq=inv_freq.expand(len(prompts), -1), attention_factor=torch.ones(len(prompts)),
            logits_indices=torch.tensor([starts[s + 1] - 1 for s in sampled]),
            max_query_len=max(b - a for a, b in zip(starts, starts[1:])), max_seq_len=max(seq_lens))
        batch = ForwardBatch(**{name: value.to(device) if isinstance(value, torch.Tensor) else value
                                for name, value in vars(batch).items()})
        if decode_graphs is not None and decode_graphs.fits(batch):
            logits = decode_graphs.run(batch).clone()  # graph outputs are overwritten by the next replay
        else:
            logits = model.forward(batch, cache)
        all_logits.append(logits.cpu())
        for s, token in zip(sampled, logits.argmax(-1).tolist()):
            tokens[s].append(token)
            generated[s].append(token)
    return torch.cat(all_logits), generated


def weight_elements(model: LlamaModel) -> int:
    """Elements of the weights this rank holds (a tied LM head counted once)."""
    tensors = {id(t): t for t in [model.embed_tokens, model.lm_head, model.norm]}
    for layer in model.layers:
        tensors.update({id(t): t for t in vars(layer).values() if isinstance(t, torch.Tensor)})
    return sum(t.numel() for t in tensors.values())


def _rank_main(rank: int, world_size: int, rendezvous: str, out_dir: str, config: ModelConfig,
               weights: dict[str, torch.Tensor], prompts: list[list[int]], first_chunk: int, decode_steps: int,
               cuda: bool):
    torch.set_num_threads(1)  # N ranks share the machine's cores
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo", init_method=rendezvous, rank=rank, world_size=world_size)
    try:
        model = LlamaModel(config, weights, device, TensorParallel.from_process_group())
        del weights
        logits, generated = greedy_paged_run(model, prompts, first_chunk, decode_steps, graphs=cuda)
        torch.save({"logits": logits, "generated": generated, "weight_elements": weight_elements(model),
                    "local_heads": (model.num_local_heads, model.num_local_kv_heads)},
                   Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def run_tensor_parallel(world_size: int, work_dir: Path, config: ModelConfig, weights: dict[str, torch.Tensor],
                        prompts: list[list[int]], first_chunk: int, decode_steps: int,
                        cuda: bool = False) -> list[dict]:
    """What each rank of a world_size group saw running greedy_paged_run, rank by rank (with
    cuda: rank r on GPU r over NCCL, decode steps through CUDA graphs). The weights reach the
    ranks through shared memory, not a reload per process."""
    work_dir.mkdir(parents=True, exist_ok=False)
    rendezvous = f"file://{work_dir / 'rendezvous'}"
    mp.spawn(_rank_main, nprocs=world_size, join=True,
             args=(world_size, rendezvous, str(work_dir), config, weights, prompts, first_chunk, decode_steps, cuda))
    return [torch.load(work_dir / f"rank{rank}.pt") for rank in range(world_size)]

