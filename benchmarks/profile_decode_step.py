"""Where the host time of engine decode steps goes: cProfile over pure-decode steps.

  python benchmarks/profile_decode_step.py --random-llama3-8b --batch 64 --context 1024
"""

import argparse
import cProfile
import pstats
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from random_model import build_engine  # noqa: E402

from ropeway import EngineConfig, SamplingParams  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--random-llama3-8b", action="store_true")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--kv-gib", type=float, default=40)
    args = parser.parse_args()
    config = EngineConfig(max_num_seqs=args.batch, max_num_batched_tokens=8192, enable_prefix_caching=False,
                          kv_cache_memory_bytes=int(args.kv_gib * 2**30))
    engine = build_engine(config, args.random_llama3_8b)
    params = SamplingParams(temperature=0, max_tokens=args.steps * 2 + 8, ignore_eos=True, detokenize=False)
    prompts = torch.randint(0, 1000, (args.batch, args.context), generator=torch.Generator().manual_seed(0))
    for i, prompt in enumerate(prompts.tolist()):
        engine.add_request(f"profile-{i}", prompt, params)
    while True:  # through the prefill
        engine.step()
        plan = engine.scheduler.last_plan
        if plan is not None and all(item.num_new_tokens == 1 for item in plan.scheduled):
            break
    for _ in range(args.steps):  # graphs captured, allocator warm
        engine.step()
    profile = cProfile.Profile()
    started = time.perf_counter()
    profile.enable()
    for _ in range(args.steps):
        engine.step()
    profile.disable()
    per_step_ms = (time.perf_counter() - started) / args.steps * 1000
    print(f"batch {args.batch}, context {args.context}: {per_step_ms:.2f} ms per step")
    pstats.Stats(profile).sort_stats("tottime").print_stats(25)


if __name__ == "__main__":
    main()
