"""Long-context evaluation of RoPE plans on the default model (trained context 8k).

  (a) perplexity against context length, on Python's own documentation (pydoc_data.topics);
  (b) passkey retrieval: filler text, "The pass key is N. Remember it. N is the pass key."
      at a random depth, then the question; 20 trials per length.

  python benchmarks/long_context.py                       # CPU: lengths up to 8k by default
  python3 benchmarks/long_context.py --lengths 2048,4096,8192,16384,32768   # GPU machine
  python3 benchmarks/long_context.py --kv-cache-dtype auto,fp8   # each plan on each KV cache dtype

Every scaling type uses factor 4 (8k x 4 = 32k). Prints tables, writes JSON and PNG plots. With
several KV cache dtypes, rows are plan/dtype, and a last table gives each dtype's perplexity
relative to the first dtype's and its passkey accuracy minus the first's.
"""

import argparse
import json
import math
import random
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
from tqdm import tqdm

from ropeway import LLM, ContextParams, EngineConfig, LLMEngine, SamplingParams
from ropeway.engine import LoadedModel
from ropeway.engine.kv_pool import KVPoolShape, allocate_kv_cache
from ropeway.models import ForwardBatch
from ropeway.scheduler import RopeScaling
from ropeway.arith import cdiv
from ropeway.models import rope_parameters

FACTOR = 4.0
PLANS = {
    "none": None,
    "linear": {"rope_type": "linear", "factor": FACTOR},
    "ntk": {"rope_type": "ntk", "factor": FACTOR},
    "dynamic": {"rope_type": "dynamic", "factor": FACTOR},
    "yarn": {"rope_type": "yarn", "factor": FACTOR},
    "dynamic-yarn": {"rope_type": "dynamic-yarn", "factor": FACTOR},
}
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "


def documentation_tokens(tokenizer, count: int) -> list[int]:
    import pydoc_data.topics

    text = "\n\n".join(pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics))
    ids = tokenizer.encode(text)
    if len(ids) < count:
        raise SystemExit(f"the corpus has {len(ids)} tokens, fewer than {count}")
    return ids[:count]


@torch.inference_mode()
def perplexity(llm: LLM, ids: list[int], scaling: dict | None, chunk: int) -> float:
    """Perplexity of predicting ids[1:] from ids[:-1], under the plan the engine would choose for
    a request of that length, computed by chunked prefill into a private paged cache of the
    engine's KV cache dtype."""
    engine = llm.engine
    block_size, device = engine.config.block_size, engine.device
    n = len(ids) - 1
    plan = engine.planner.plan(n, RopeScaling.from_dict(scaling) if scaling else None)
    inv_freq, factor = rope_parameters(plan)
    blocks = cdiv(n, block_size)
    kv_cache = allocate_kv_cache(engine.model, KVPoolShape(blocks, block_size, engine.pool.bytes_per_block),
                                 engine.kv_dtype, device)
    table = torch.randperm(blocks, device=device).to(torch.int32)  # paged, not contiguous
    tokens = torch.tensor(ids, device=device)
    nll, counted = 0.0, 0
    for start in range(0, n, chunk):
        end = min(n, start + chunk)
        positions = torch.arange(start, end, device=device)
        batch = ForwardBatch.one_sequence(
            tokens[start:end], positions, table[positions // block_size].long() * block_size + positions % block_size,
            table, end, inv_freq.to(device), factor, torch.arange(end - start, device=device))
        logits = engine.model.forward(batch, kv_cache)
        targets = tokens[start + 1 : end + 1]
        logprobs = logits[: len(targets)].log_softmax(-1).gather(1, targets[:, None])
        nll -= logprobs.sum().item()
        counted += len(targets)
    return math.exp(nll / counted)


def passkey_prompt(tokenizer, length: int, rng: random.Random) -> tuple[list[int], str]:
    key = str(rng.randint(10000, 99999))
    needle = f" The pass key is {key}. Remember it. {key} is the pass key. "
    question = " What is the pass key? The pass key is"
    filler_ids = tokenizer.encode(FILLER)
    budget = length - len(tokenizer.encode(needle + question)) - 8
    repeats = max(1, budget // len(filler_ids))
    depth = rng.randint(0, repeats)
    text = FILLER * depth + needle + FILLER * (repeats - depth) + question
    return tokenizer.encode(text), key


def passkey_accuracy(llm: LLM, length: int, scaling: dict | None, trials: int, seed: int) -> float:
    rng = random.Random(seed + length)
    prompts, keys = zip(*(passkey_prompt(llm.tokenizer, length, rng) for _ in range(trials)))
    outputs = llm.generate(list(prompts), SamplingParams(temperature=0, max_tokens=8),
                           context=ContextParams(rope_scaling=scaling))
    return sum(key in o.outputs[0].text for o, key in zip(outputs, keys)) / trials


def dtype_differences(results: dict, names: list[str], kv_cache_dtypes: list[str], lengths: list[int]) -> dict:
    """Per plan and later dtype: perplexity / the first dtype's - 1, and passkey accuracy minus the first's."""
    base = kv_cache_dtypes[0]
    out = {"perplexity_ratio_minus_1": {}, "passkey_difference": {}}
    for name in names:
        for kv in kv_cache_dtypes[1:]:
            ppl = results["perplexity"]
            out["perplexity_ratio_minus_1"][f"{name}/{kv}"] = {
                str(n): ppl[f"{name}/{kv}"][str(n)] / ppl[f"{name}/{base}"][str(n)] - 1 for n in lengths}
            if results["passkey"]:
                key = results["passkey"]
                out["passkey_difference"][f"{name}/{kv}"] = {
                    str(n): key[f"{name}/{kv}"][str(n)] - key[f"{name}/{base}"][str(n)] for n in lengths}
    return {measure: values for measure, values in out.items() if values}


def plot(results: dict, measure: str, lengths: list[int], path: Path, ylabel: str, log: bool) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, values in results[measure].items():
        ax.plot(lengths, [values[str(n)] for n in lengths], marker="o", label=name)
    ax.axvline(8192, color="grey", linestyle=":", label="trained context (8k)")
    ax.set_xscale("log", base=2)
    if log:
        ax.set_yscale("log")
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel(ylabel)
    ax.set_title(f"SmolLM2-135M: {measure} against context length")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", default=None, help="comma-separated (default: up to 32k on GPU, 8k on CPU)")
    parser.add_argument("--plans", default=",".join(PLANS))
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--chunk", type=int, default=2048)
    parser.add_argument("--skip-passkey", action="store_true")
    parser.add_argument("--out-dir", default="results/long_context")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--kv-cache-dtype", default="auto",
                        help="comma-separated KV cache dtypes, each run on every plan (e.g. auto,fp8; default: auto)")
    args = parser.parse_args()

    cuda = torch.cuda.is_available()
    default_lengths = "2048,4096,8192,16384,32768" if cuda else "2048,4096,8192"
    lengths = [int(n) for n in (args.lengths or default_lengths).split(",")]
    names = args.plans.split(",")
    longest = max(lengths)
    # Requests without their own scaling use the model's RoPE ("none") up to this limit, so
    # `none` can be measured past the trained context, where it breaks.
    config = EngineConfig(dtype="bfloat16" if cuda else "float32", max_model_len=longest + 64,
                          kv_cache_memory_bytes=(24 << 30) if cuda else (2 << 30),
                          max_num_batched_tokens=8192, max_num_seqs=args.trials)
    kv_cache_dtypes = args.kv_cache_dtype.split(",")
    # One engine per KV cache dtype, all on the model loaded once.
    first = LLM(engine=LLMEngine(replace(config, kv_cache_dtype=kv_cache_dtypes[0])))
    loaded = LoadedModel(first.engine.model, first.tokenizer, 0.0)
    llms = {kv: first if i == 0 else LLM(engine=LLMEngine(replace(config, kv_cache_dtype=kv), loaded=loaded))
            for i, kv in enumerate(kv_cache_dtypes)}
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ids = documentation_tokens(first.tokenizer, longest + 1)

    def row(name: str, kv: str) -> str:
        return name if len(llms) == 1 else f"{name}/{kv}"

    results = {"perplexity": {}, "passkey": {}}
    started = time.perf_counter()
    work = [(name, kv, n) for name in names for kv in llms for n in lengths]
    for name, kv, n in tqdm(work, desc="perplexity"):
        results["perplexity"].setdefault(row(name, kv), {})[str(n)] = perplexity(
            llms[kv], ids[: n + 1], PLANS[name], args.chunk)
    if not args.skip_passkey:
        for name, kv, n in tqdm(work, desc="passkey"):
            accuracy = passkey_accuracy(llms[kv], n, PLANS[name], args.trials, args.seed)
            results["passkey"].setdefault(row(name, kv), {})[str(n)] = accuracy
    if len(llms) > 1:
        results["kv_cache_dtype_vs_first"] = dtype_differences(results, names, kv_cache_dtypes, lengths)

    device = torch.cuda.get_device_name() if cuda else "cpu"
    meta = {"model": first.engine.model_config.name, "device": device, "dtype": str(first.engine.dtype),
            "kv_cache_dtypes": [llms[kv].engine.kv_cache_dtype_name for kv in llms],
            "factor": FACTOR, "lengths": lengths, "trials": args.trials, "seconds": time.perf_counter() - started,
            "command": " ".join(sys.argv)}
    for measure, fmt in (("perplexity", "{:>10.2f}"), ("passkey", "{:>10.2f}")):
        if not results[measure]:
            continue
        print(f"\n{measure} ({meta['model']}, {device}, factor {FACTOR})")
        print(f"{'plan':>13}" + "".join(f"{n:>10}" for n in lengths))
        for name, values in results[measure].items():
            print(f"{name:>13}" + "".join(fmt.format(values[str(n)]) for n in lengths))
        plot(results, measure, lengths, out_dir / f"{measure}.png",
             "perplexity" if measure == "perplexity" else "passkey accuracy", log=measure == "perplexity")
    for measure, values in results.get("kv_cache_dtype_vs_first", {}).items():
        print(f"\n{measure} against {kv_cache_dtypes[0]}")
        print(f"{'plan':>13}" + "".join(f"{n:>10}" for n in lengths))
        for name, by_length in values.items():
            print(f"{name:>13}" + "".join(f"{by_length[str(n)]:>+10.4f}" for n in lengths))
    (out_dir / "long_context.json").write_text(json.dumps({"meta": meta, **results}, indent=2))
    print(f"\nwrote {out_dir}/long_context.json and PNG plots ({meta['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
